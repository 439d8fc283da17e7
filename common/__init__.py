"""What every ugro package shares: reading configuration files that users edit."""
