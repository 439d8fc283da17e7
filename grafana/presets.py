"""Shared building blocks for ugro's dashboards: the datasource, queries, variables and the
panel kinds every row uses, each with a unit and a description.

Panel functions elsewhere call these with their own title, query and unit; ids are given when a
dashboard is assembled (``numbered``), so adding a panel never renumbers by hand.
"""

from __future__ import annotations

from collections.abc import Iterable

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.builders.common import (
    GraphThresholdsStyleConfig,
    ReduceDataOptions,
    StackingConfig,
    VizLegendOptions,
)
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

# The provisioned Prometheus datasource (grafana/provisioning/datasources/ugro.yml). Panels
# refer to it through the `datasource` variable, whose default is this uid.
PROMETHEUS_UID = "ugro-prometheus"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Units Grafana knows, named once.
TOKENS_PER_SECOND = "suffix: tok/s"
RATIO = "percentunit"
SECONDS = "s"
BYTES = "bytes"
BYTES_PER_SECOND = "Bps"
CELSIUS = "celsius"
WATTS = "watt"
COUNT = "short"
NO_UNIT = "none"

PanelBuilder = cogbuilder.Builder[model.Panel]


def query(expr: str, legend: str = "", ref_id: str = "A", *, instant: bool = False):
    """A Prometheus target. Range queries feed graphs; instant ones feed stats and tables."""
    target = prometheus.Dataquery().expr(expr).ref_id(ref_id).datasource(DATASOURCE)
    if legend:
        target = target.legend_format(legend)
    return target.instant().format(PromQueryFormat.TABLE) if instant else target.range()


def with_targets(panel, queries: Iterable):
    for target in queries:
        panel = panel.with_target(target)
    return panel


def graph(
    title: str,
    description: str,
    unit: str,
    *queries,
    width: int = 8,
    height: int = 8,
    minimum: float | None = None,
    maximum: float | None = None,
    threshold: float | None = None,
    stacked: bool = False,
) -> timeseries.Panel:
    """A time series panel; ``threshold`` draws a dashed red line (an alert's threshold);
    ``stacked`` piles the series up (shares that add up to a whole)."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .span(width)
        .height(height)
        .line_width(1)
        .fill_opacity(8)
        .legend(
            VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "max"])
        )
    )
    if stacked:
        panel = panel.stacking(StackingConfig().mode(common.StackingMode.NORMAL)).fill_opacity(60)
    if minimum is not None:
        panel = panel.min(minimum)
    if maximum is not None:
        panel = panel.max(maximum)
    if threshold is not None:
        panel = panel.thresholds(
            dash.ThresholdsConfig()
            .mode(model.ThresholdsMode.ABSOLUTE)
            .steps([model.Threshold(None, "green"), model.Threshold(threshold, "red")])
        ).thresholds_style(
            GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED)
        )
    return with_targets(panel, queries)


def single_value(
    title: str,
    description: str,
    unit: str,
    expr: str,
    *,
    width: int = 4,
    height: int = 4,
    red_from: float | None = None,
    decimals: int | None = None,
) -> stat.Panel:
    """A stat panel showing the last value of one instant query; red from ``red_from`` on."""
    steps = [model.Threshold(None, "green")]
    if red_from is not None:
        steps.append(model.Threshold(red_from, "red"))
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .span(width)
        .height(height)
        .graph_mode(common.BigValueGraphMode.NONE)
        .color_mode(common.BigValueColorMode.VALUE)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .thresholds(dash.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(steps))
        .with_target(query(expr, instant=True))
    )
    if decimals is not None:
        panel = panel.decimals(decimals)
    return panel


def states(
    title: str,
    description: str,
    *queries,
    ok: str,
    bad: str,
    bad_value: int = 1,
    width: int = 12,
    height: int = 6,
) -> statetimeline.Panel:
    """A state timeline of 0/1 series, named ``ok``/``bad`` instead of numbers."""
    return named_states(
        title,
        description,
        *queries,
        names={1 - bad_value: (ok, "green"), bad_value: (bad, "red")},
        show_value=common.VisibilityMode.NEVER,
        width=width,
        height=height,
    )


def named_states(
    title: str,
    description: str,
    *queries,
    names: dict[int, tuple[str, str]],
    show_value: common.VisibilityMode = common.VisibilityMode.AUTO,
    width: int = 12,
    height: int = 6,
) -> statetimeline.Panel:
    """A state timeline whose values are codes: ``names`` maps each to (text, colour)."""
    mapping = model.ValueMap(
        {
            str(value): model.ValueMappingResult(text=text, color=color, index=index)
            for index, (value, (text, color)) in enumerate(sorted(names.items()))
        }
    )
    panel = (
        statetimeline.Panel()
        .title(title)
        .description(description)
        .unit(NO_UNIT)
        .datasource(DATASOURCE)
        .span(width)
        .height(height)
        .mappings([mapping])
        .show_value(show_value)
        .fill_opacity(80)
    )
    return with_targets(panel, queries)


def listing(
    title: str,
    description: str,
    expr: str,
    columns: dict[str, str],
    *,
    width: int = 24,
    height: int = 8,
) -> table.Panel:
    """A table of one instant query's series: ``columns`` maps the labels kept to headers."""
    organize = model.DataTransformerConfig(
        id_val="organize",
        options={
            "excludeByName": {"Time": True, "Value": True, "__name__": True},
            "indexByName": {label: i for i, label in enumerate(columns)},
            "renameByName": columns,
        },
    )
    keep_only = model.DataTransformerConfig(
        id_val="filterFieldsByName", options={"include": {"names": list(columns)}}
    )
    return (
        table.Panel()
        .title(title)
        .description(description)
        .unit(NO_UNIT)
        .datasource(DATASOURCE)
        .span(width)
        .height(height)
        .with_target(query(expr, instant=True))
        .with_transformation(keep_only)
        .with_transformation(organize)
        .no_value("Nothing firing")
    )


def datasource_variable() -> dash.DatasourceVariable:
    return (
        dash.DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
        .current(model.VariableOption(selected=True, text="Prometheus", value=PROMETHEUS_UID))
    )


def label_variable(
    name: str, label: str, series: str, *, multi: bool, description: str
) -> dash.QueryVariable:
    """A variable listing the values of label ``name`` on ``series`` (a selector)."""
    variable = (
        dash.QueryVariable(name)
        .label(label)
        .description(description)
        .datasource(DATASOURCE)
        .query(
            {"qryType": 1, "query": f"label_values({series}, {name})", "refId": f"{name}-values"}
        )
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.NATURAL_ASC)
    )
    if multi:
        variable = variable.multi(True).include_all(True).all_value(".*")
    return variable


class _PrometheusAnnotation(model.AnnotationQuery):
    """An annotation query with the Prometheus datasource's own fields, which the SDK's
    generic ``AnnotationQuery`` does not model."""

    def __init__(self, title_format: str, tag_keys: str, text_format: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.title_format, self.tag_keys, self.text_format = title_format, tag_keys, text_format

    def to_json(self) -> dict[str, object]:
        payload = super().to_json()
        payload.update(
            titleFormat=self.title_format,
            tagKeys=self.tag_keys,
            textFormat=self.text_format,
            useValueForTime=False,
            step="$__interval",
        )
        return payload


class AlertAnnotation(dash.AnnotationQuery):
    def __init__(self, name: str, expr: str, text: str) -> None:
        self._internal = _PrometheusAnnotation(
            title_format="{{alertname}}",
            tag_keys="severity,rank,node",
            text_format=text,
            name=name,
            datasource=DATASOURCE,
            enable=True,
            icon_color="red",
            expr=expr,
        )


def alert_annotation(name: str, expr: str, text: str) -> AlertAnnotation:
    """Marks on every graph's time axis while an alert matching ``expr`` fires."""
    return AlertAnnotation(name, expr, text)


def dashboard_link(title: str, uid: str) -> dash.DashboardLink:
    """A link to another ugro dashboard that keeps the time range."""
    return (
        dash.DashboardLink(title)
        .type(model.DashboardLinkType.LINK)
        .url(f"/d/{uid}")
        .keep_time(True)
        .icon("dashboard")
    )


def numbered(rows: Iterable[tuple[dash.Row, list[PanelBuilder]]], board: dash.Dashboard):
    """Adds the rows and their panels to ``board`` with ids 1, 2, 3... in reading order."""
    next_id = 1
    for row, panels in rows:
        board = board.with_row(row.id(next_id))
        next_id += 1
        for panel in panels:
            board = board.with_panel(panel.id(next_id))
            next_id += 1
    return board
