"""Local stand-ins for where alerts go: a Slack incoming webhook and an SMTP server."""

from __future__ import annotations

import email
import email.message
import email.policy
import json
import logging
import threading
import time
import warnings
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from ugro.common.ports import free_port

# aiosmtpd warns on every connection that AUTH without TLS is unsafe: this server listens on
# loopback only, and Go's SMTP client sends PLAIN credentials in clear to localhost only.
warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS", UserWarning)
logging.getLogger("mail.log").setLevel(logging.ERROR)


@dataclass
class Received:
    at: float  # time.time() on arrival
    payload: object


class SlackWebhookRecorder:
    """Stands in for a Slack incoming webhook: records every JSON body posted to it."""

    def __init__(self) -> None:
        self.posts: list[Received] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                payload = json.loads(self.rfile.read(length))
                recorder.posts.append(Received(time.time(), payload))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok")  # what Slack answers

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T0/B0/test"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def texts(self) -> list[str]:
        """Each post's title and text together, as a reader of the channel sees them."""
        out = []
        for post in self.posts:
            for attachment in post.payload.get("attachments", []):
                out.append(f"{attachment.get('title', '')}\n{attachment.get('text', '')}")
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class MailSink:
    """A local SMTP server that requires the password Alertmanager reads from its secret file."""

    def __init__(self, password: str) -> None:
        self.messages: list[Received] = []
        self.logins: list[str] = []
        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope) -> str:
                message = email.message_from_bytes(envelope.content, policy=email.policy.default)
                sink.messages.append(Received(time.time(), message))
                return "250 OK"

        def authenticate(server, session, envelope, mechanism, auth_data) -> AuthResult:
            ok = isinstance(auth_data, LoginPassword) and auth_data.password == password.encode()
            if ok:
                sink.logins.append(auth_data.login.decode())
            return AuthResult(success=ok, handled=False)  # unhandled: the server answers 535

        self.port = free_port()
        # Go's PLAIN auth sends credentials in clear only to localhost; LOGIN is left out
        # because Alertmanager's LOGIN exchange does not match aiosmtpd's prompts.
        self.controller = Controller(
            Handler(),
            hostname="127.0.0.1",
            port=self.port,
            authenticator=authenticate,
            auth_required=True,
            auth_require_tls=False,
            auth_exclude_mechanism=["LOGIN"],
        )
        self.controller.start()

    def texts(self) -> list[str]:
        out = []
        for received in self.messages:
            message = received.payload
            body = message.get_body(preferencelist=("plain",))
            out.append(f"{message['Subject']}\n{body.get_content() if body else ''}")
        return out

    def close(self) -> None:
        self.controller.stop()
