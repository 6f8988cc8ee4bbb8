"""surd's labeling config (``label_config.xml``, documented there) and the check that a
project uses it: push and pull read the control names below, so a project configured otherwise
would silently lose decisions."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from functools import cache
from importlib import resources

# control name -> tag, as label_config.xml defines them
REQUIRED_CONTROLS = {
    "image": "Image",
    "complex_prompt": "Text",
    "narrative_prompt": "TextArea",
    "decision": "Choices",
    "problems": "Choices",
}
DECISIONS = ("accept", "corrected", "reject")
PROBLEM_TAGS = ("subject", "count", "colour", "action", "setting", "unsafe")


@cache
def label_config() -> str:
    return resources.files("annotation").joinpath("label_config.xml").read_text("utf-8")


def check_label_config(xml: str) -> str | None:
    """What makes ``xml`` unlike surd's config, or None if it has every control surd reads."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as error:
        return f"not valid XML: {error}"
    found = {element.get("name"): element.tag for element in root.iter() if element.get("name")}
    for name, tag in REQUIRED_CONTROLS.items():
        if found.get(name) != tag:
            return f'it has no <{tag} name="{name}">'
    choices = {
        element.get("value")
        for control in root.iter("Choices")
        if control.get("name") == "decision"
        for element in control.iter("Choice")
    }
    if not set(DECISIONS) <= choices:
        return f"its decision choices are {sorted(choices)}, not {list(DECISIONS)}"
    return None
