"""``--help`` that reads well in an 80-column terminal: Typer's rich help, with three changes.

Typer (0.29) lays an options panel out as one table of seven columns (``*``, long name, short
name, negative name, value type, help) and leaves Rich to fit them in the terminal; when they do
not fit, Rich shrinks the widest columns to the same width, names included, and cuts them short
(``--validation-sp…``, ``--no-include-sour…``). It shows ``<bool>`` as the value of a flag, which
takes none. And in a Commands panel it keeps the line breaks of a docstring's first paragraph, so
a summary written over two source lines breaks mid-sentence. Here, for every command under the
root (see :func:`use_readable_help`):

* an options panel has three columns: ``*``, the names, the help. The names column is as wide as
  the longest name (never cut); a flag's negative form goes under it, the value type after it
  (under it where it does not fit in the column); the help takes the rest of the width;
* flags show no value type;
* docstring paragraphs are re-flowed: single line breaks become spaces, except in a paragraph
  that starts with ``\\b`` (Click's mark for "keep my lines") and before an indented or bulleted
  line.

Typer's own functions are replaced in ``typer.rich_utils`` only when help is rendered (importing it
costs start-up time), and only if they still have the signatures this module was written for;
otherwise Typer's layout is left as it is.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any

import typer
from typer.core import TyperArgument

# The share of the terminal the names column may take to fit a value type on a name's line.
_NAMES_SHARE = 0.4
_KEEP_LINE = re.compile(r"\s|[-*•] |\d+[.)] ")  # a line that starts an indented or list line


class HelpContext(typer.Context):
    """A context whose help is rendered with this module's layout."""

    def get_help(self) -> str:
        _install()
        return super().get_help()


def use_readable_help(command: Any) -> None:
    """Render the ``--help`` of ``command`` and of every command under it with this layout."""
    if issubclass(HelpContext, command.context_class):  # Click's or Typer's: not a custom one
        command.context_class = HelpContext
    for sub in getattr(command, "commands", {}).values():
        use_readable_help(sub)


def command_paths(group: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path under the Click command ``group``, depth first in name order (the
    root is ``()``): what a check of every command's ``--help`` walks."""
    paths = [path]
    if hasattr(group, "commands"):  # a group (Typer vendors its own Click)
        for name in sorted(group.commands):
            paths += command_paths(group.commands[name], (*path, name))
    return paths


def reflow(text: str) -> str:
    """``text`` with the single line breaks inside its paragraphs made spaces (see the module)."""
    return "\n\n".join(_reflow_paragraph(p) for p in text.split("\n\n"))


def _reflow_paragraph(paragraph: str) -> str:
    if paragraph.startswith("\b"):
        return paragraph
    lines = paragraph.split("\n")
    kept = [lines[0]]
    for line in lines[1:]:
        if _KEEP_LINE.match(line) or not kept[-1].strip():
            kept.append(line)
        else:
            kept[-1] = f"{kept[-1].rstrip()} {line.strip()}"
    return "\n".join(kept)


_PATCHES = {
    "_print_options_panel": {"name", "params", "ctx", "markup_mode", "console"},
    "_make_command_help": {"help_text", "markup_mode"},
    "_fix_linebreaks": {"paragraphs", "markup_mode"},
}
_USED = {"_get_parameter_help", "highlighter", "negative_highlighter", "types_highlighter"}


@functools.cache
def _install() -> None:
    from typer import rich_utils

    for name, parameters in _PATCHES.items():
        function = getattr(rich_utils, name, None)
        if function is None or set(inspect.signature(function).parameters) != parameters:
            return  # another Typer: keep its layout rather than break its help
    if not all(hasattr(rich_utils, name) for name in _USED):
        return
    make_command_help, fix_linebreaks = rich_utils._make_command_help, rich_utils._fix_linebreaks

    def _make_command_help(*, help_text: str, markup_mode: Any) -> Any:
        if markup_mode == rich_utils.MARKUP_MODE_RICH:
            help_text = reflow(inspect.cleandoc(help_text))
        return make_command_help(help_text=help_text, markup_mode=markup_mode)

    def _fix_linebreaks(paragraphs: list[str], markup_mode: Any) -> str:
        if markup_mode == rich_utils.MARKUP_MODE_RICH:
            paragraphs = [reflow(p).removeprefix("\b\n") for p in paragraphs]
        return fix_linebreaks(paragraphs=paragraphs, markup_mode=markup_mode)

    rich_utils._print_options_panel = _print_options_panel
    rich_utils._make_command_help = _make_command_help
    rich_utils._fix_linebreaks = _fix_linebreaks


def _print_options_panel(*, name: str, params: list, ctx: Any, markup_mode: Any, console) -> None:
    """An options or arguments panel: ``*``, names (with the value type), help."""
    from rich import box
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text
    from typer import rich_utils as ru

    if not params:
        return
    rows = [(param, _names(param, ru), _value_type(param, ctx, ru)) for param in params]
    # one names column width (and `*` column) for all the command's panels, so they line up
    shown = [p for p in ctx.command.get_params(ctx) if not getattr(p, "hidden", False)] or params
    everything = [(_names(p, ru), _value_type(p, ctx, ru)) for p in shown]
    names_width = max(len(line.plain) for names, _ in everything for line in names)
    with_types = max(
        len(names[0].plain) + (1 + len(value.plain) if value else 0) for names, value in everything
    )
    width = max(names_width, min(with_types, int(console.width * _NAMES_SHARE)))
    table = Table(
        highlight=True,
        show_header=False,
        expand=True,
        box=getattr(box, ru.STYLE_OPTIONS_TABLE_BOX, None),
        show_lines=ru.STYLE_OPTIONS_TABLE_SHOW_LINES,
        leading=ru.STYLE_OPTIONS_TABLE_LEADING,
        border_style=ru.STYLE_OPTIONS_TABLE_BORDER_STYLE,
        row_styles=ru.STYLE_OPTIONS_TABLE_ROW_STYLES,
        pad_edge=ru.STYLE_OPTIONS_TABLE_PAD_EDGE,
        padding=ru.STYLE_OPTIONS_TABLE_PADDING,
    )
    required = any(param.required for param in shown)
    if required:
        table.add_column(no_wrap=True, width=len(ru.REQUIRED_SHORT_STRING))
    table.add_column(width=width)  # fixed: Rich never shrinks it, so no name is cut
    table.add_column(ratio=1)
    for param, names, value in rows:
        cells: list[Any] = []
        if required:
            mark = ru.REQUIRED_SHORT_STRING if param.required else ""
            cells.append(Text(mark, style=ru.STYLE_REQUIRED_SHORT))
        first, *others = names
        if value is not None and len(first.plain) + 1 + len(value.plain) <= width:
            first = Text.assemble(first, " ", value)
        elif value is not None:
            others = [*others, Text.assemble("  ", value)]
        cells.append(Text("\n").join([first, *others]))
        described = ru._get_parameter_help(param=param, ctx=ctx, markup_mode=markup_mode)
        for item in getattr(described, "renderables", ()):
            if isinstance(item, Text) and item.overflow is None:
                item.overflow = "fold"  # a long URL default wraps rather than ends in "…"
        cells.append(described)
        table.add_row(*cells)
    console.print(
        Panel(
            table,
            border_style=ru.STYLE_OPTIONS_PANEL_BORDER,
            title=name,
            title_align=ru.ALIGN_OPTIONS_PANEL,
        )
    )


def _names(param: Any, ru: Any) -> list:
    """The lines of a parameter's names: ``--long, -s``, then the negative ``--no-long``."""
    if isinstance(param, TyperArgument):
        label = param.display_name_raw
        if param.metavar is None and param.nargs != 1:
            label += "..."
        return [ru.highlighter(label)]
    lines = [ru.highlighter(", ".join(_long_first(param.opts)))]
    if param.secondary_opts:
        lines.append(ru.negative_highlighter(", ".join(_long_first(param.secondary_opts))))
    return lines


def _long_first(opts: list[str]) -> list[str]:
    return sorted(opts, key=lambda opt: not opt.startswith("--"))


def _value_type(param: Any, ctx: Any, ru: Any):
    """The value a parameter takes (``<int range> [x>=1]``), or None for a flag (it takes none)."""
    from rich.text import Text

    if getattr(param, "is_flag", False):
        return None
    shown = param.display_type_rich(ctx=ctx)
    number_range = param._get_number_range_help_str()
    if shown is None and not number_range:
        return None
    text = Text(shown or "", style=ru.STYLE_TYPES, overflow="fold")
    if number_range:
        text.append(ru.RANGE_STRING.format(number_range))
    return ru.types_highlighter(text)
