"""Option groups (``surd_builder.cli.options``): a dataclass of Typer options that a command takes
as one parameter, and whose options appear in ``--help`` and on the command line as if written
out at that place."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from surd_builder.cli.options import Adjusted, option_groups


@dataclasses.dataclass(frozen=True)
class Colours:
    red: Annotated[int, typer.Option(min=0, help="Red.")] = 1
    green: Annotated[int, typer.Option(help="Green.")] = 2
    blue: Annotated[str, typer.Option(envvar="TEST_BLUE", help="Blue.")] = "b"


def make_app(seen: list) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @option_groups
    def paint(
        ctx: typer.Context,
        name: Annotated[str, typer.Argument(help="What to paint.")],
        *,
        colours: Annotated[Colours, Adjusted(defaults={"green": 5}, fixed={"blue": "fixed"})],
        last: Annotated[bool, typer.Option(help="After the group.")] = False,
    ) -> None:
        sources = {n: ctx.get_parameter_source(n).name for n in ("red", "green")}
        seen.append((name, colours, last, sources))

    @app.command()
    @option_groups
    def other(*, colours: Colours) -> None:
        seen.append(colours)

    return app


def test_a_group_packs_its_options_with_the_commands_adjustments():
    seen: list = []
    result = CliRunner().invoke(make_app(seen), ["paint", "wall", "--red", "7", "--last"])
    assert result.exit_code == 0, result.output
    name, colours, last, sources = seen[0]
    assert (name, last) == ("wall", True)
    assert colours == Colours(red=7, green=5, blue="fixed")
    # the parameters keep the options' own names: surd.toml precedence reads their sources
    assert sources == {"red": "COMMANDLINE", "green": "DEFAULT"}


def test_the_groups_options_sit_in_its_place_and_a_fixed_field_is_no_option():
    command = typer.main.get_command(make_app([])).commands["paint"]
    names = [parameter.name for parameter in command.params]
    assert names == ["name", "red", "green", "last"]
    result = CliRunner().invoke(make_app([]), ["paint", "wall", "--blue", "x"])
    assert result.exit_code == 2 and "No such option" in result.output


def test_an_unadjusted_group_keeps_its_defaults_and_checks_its_limits():
    seen: list = []
    app = make_app(seen)
    assert CliRunner().invoke(app, ["other"], env={"TEST_BLUE": "env"}).exit_code == 0
    assert seen == [Colours(red=1, green=2, blue="env")]
    result = CliRunner().invoke(app, ["other", "--red", "-1"])
    assert result.exit_code == 2 and "red" in result.output


def test_adjusting_a_field_the_group_lacks_is_an_error_at_import():
    def command(*, colours: Annotated[Colours, Adjusted(defaults={"purple": 1})]) -> None:
        pass

    with pytest.raises(TypeError, match="purple"):
        option_groups(command)
