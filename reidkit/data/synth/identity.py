"""Identities of the synthetic pedestrians: colour palettes, cue values and look-alike
families.

Identity cues live in separate body regions (head: hair colour/style and hat; upper
garment: colour, sleeves, pattern plain/stripes/logo; lower garment: colour and type
trousers/shorts/skirt; shoes; carried bag: backpack/handbag/strap; body width/height).
Identities come in look-alike *families* that share every cue except one or two small
local ones (shoes, hat, bag, logo/stripe colour or hair colour), so a model that only
looks at the most salient cue (the upper-body colour) confuses family members.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "PALETTE",
    "HAIR_COLOURS",
    "SKIN_TONES",
    "CUE_KEYS",
    "FAMILY_VARYING_CUES",
    "sample_identity",
    "draw_family_group",
    "draw_distractor_people",
]

PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 30),
    "white": (236, 236, 230),
    "grey": (132, 132, 132),
    "dark_grey": (68, 68, 72),
    "navy": (28, 38, 92),
    "blue": (38, 88, 205),
    "light_blue": (128, 180, 232),
    "red": (205, 32, 36),
    "maroon": (112, 24, 36),
    "green": (36, 145, 62),
    "olive": (108, 112, 46),
    "yellow": (235, 205, 38),
    "orange": (238, 122, 28),
    "pink": (238, 138, 172),
    "purple": (112, 48, 152),
    "brown": (112, 70, 38),
    "beige": (205, 184, 140),
    "teal": (28, 132, 132),
}
HAIR_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (22, 18, 16),
    "dark_brown": (58, 38, 24),
    "brown": (112, 74, 42),
    "blonde": (214, 182, 108),
    "grey": (168, 166, 162),
    "auburn": (140, 58, 28),
}
SKIN_TONES: dict[str, tuple[int, int, int]] = {
    "light": (242, 208, 182),
    "fair": (226, 182, 148),
    "tan": (192, 142, 102),
    "brown": (142, 96, 64),
    "dark": (96, 64, 44),
}
UPPER_COLOURS = tuple(PALETTE)
LOWER_COLOURS = (
    "black",
    "navy",
    "blue",
    "light_blue",
    "dark_grey",
    "grey",
    "beige",
    "brown",
    "olive",
    "white",
    "maroon",
    "green",
)
SHOE_COLOURS = ("black", "white", "red", "blue", "brown", "grey", "yellow", "green", "orange")
ACCENT_COLOURS = ("white", "black", "red", "yellow", "blue", "green", "orange", "pink", "teal")
HAT_COLOURS = ("black", "white", "red", "navy", "yellow", "green", "grey", "orange", "pink")
BAG_COLOURS = ("black", "brown", "red", "blue", "grey", "green", "orange", "purple", "beige")
HAIR_STYLES = ("short", "long", "ponytail", "buzz")
HATS = ("none", "cap", "beanie")
BAGS = ("none", "backpack", "handbag", "strap")
PATTERNS = ("plain", "stripes", "logo")
LOWER_TYPES = ("trousers", "shorts", "skirt")

# cues that may differ inside a look-alike family (small, local)
FAMILY_VARYING_CUES = ("shoes", "hat", "bag", "accent", "hair_colour")
CUE_KEYS: dict[str, tuple[str, ...]] = {
    "shoes": ("shoes_colour",),
    "hat": ("hat", "hat_colour"),
    "bag": ("bag", "bag_colour"),
    "accent": ("upper_accent",),
    "hair_colour": ("hair_colour",),
}


def _choice(rng: np.random.Generator, options: Sequence[Any], p: Sequence[float] | None = None):
    if p is not None:
        p = np.asarray(p, dtype=np.float64)
        p = p / p.sum()
    return options[int(rng.choice(len(options), p=p))]


def _sample_cue(rng: np.random.Generator, cue: str, attrs: dict[str, Any]) -> dict[str, Any]:
    """New values for one family-varying cue group."""
    if cue == "shoes":
        return {"shoes_colour": _choice(rng, SHOE_COLOURS)}
    if cue == "hat":
        hat = _choice(rng, HATS, [0.5, 0.3, 0.2])
        return {"hat": hat, "hat_colour": "none" if hat == "none" else _choice(rng, HAT_COLOURS)}
    if cue == "bag":
        bag = _choice(rng, BAGS, [0.3, 0.3, 0.2, 0.2])
        return {"bag": bag, "bag_colour": "none" if bag == "none" else _choice(rng, BAG_COLOURS)}
    if cue == "accent":
        options = [c for c in ACCENT_COLOURS if c != attrs["upper_colour"]]
        return {"upper_accent": _choice(rng, options)}
    if cue == "hair_colour":
        return {"hair_colour": _choice(rng, tuple(HAIR_COLOURS))}
    raise KeyError(cue)


def sample_identity(rng: np.random.Generator) -> dict[str, Any]:
    """Draw the cue values of one identity (a JSON-able dict of names and numbers)."""
    upper = _choice(rng, UPPER_COLOURS)
    pattern = _choice(rng, PATTERNS, [0.45, 0.25, 0.3])
    lower_type = _choice(rng, LOWER_TYPES, [0.65, 0.2, 0.15])
    lower_options = [c for c in LOWER_COLOURS if c != upper] or list(LOWER_COLOURS)
    attrs: dict[str, Any] = {
        "height": round(float(rng.uniform(0.9, 1.08)), 3),
        "width": round(float(rng.uniform(0.86, 1.2)), 3),
        "skin": _choice(rng, tuple(SKIN_TONES)),
        "hair_style": _choice(rng, HAIR_STYLES, [0.4, 0.25, 0.15, 0.2]),
        "upper_colour": upper,
        "upper_pattern": pattern,
        "sleeves": _choice(rng, ("long", "short"), [0.55, 0.45]),
        "lower_type": lower_type,
        "lower_colour": _choice(rng, lower_options),
    }
    for cue in FAMILY_VARYING_CUES:
        attrs.update(_sample_cue(rng, cue, attrs))
    return attrs


def _cue_signature(attrs: dict[str, Any], cues: Sequence[str]) -> tuple:
    return tuple(attrs[k] for c in cues for k in CUE_KEYS[c])


def _make_family(
    rng: np.random.Generator, size: int, max_tries: int = 50
) -> tuple[list[dict[str, Any]], list[str]]:
    """A template identity and ``size`` members that differ only in 1-2 local cues."""
    template = sample_identity(rng)
    if size == 1:
        return [template], []
    eligible = [
        c for c in FAMILY_VARYING_CUES if c != "accent" or template["upper_pattern"] != "plain"
    ]
    num_varying = 1 if rng.random() < 0.55 else 2
    varies = sorted(rng.choice(eligible, size=num_varying, replace=False).tolist())
    members = [dict(template)]
    seen = {_cue_signature(template, varies)}
    tries = 0
    while len(members) < size and tries < max_tries * size:
        tries += 1
        member = dict(template)
        # change at least one varying cue group, sometimes both
        for i, cue in enumerate(varies):
            if i == 0 or rng.random() < 0.6:
                member.update(_sample_cue(rng, cue, member))
        sig = _cue_signature(member, varies)
        if sig not in seen:
            seen.add(sig)
            members.append(member)
    return members, varies


def draw_family_group(
    rng: np.random.Generator,
    n: int,
    split: str,
    persons: list[dict[str, Any]],
    families: dict[str, dict[str, Any]],
) -> list[int]:
    """Draw ``n`` identities in look-alike families of 1-4 and append them to ``persons``
    (``{"family", "attrs"}``) and their families to ``families``
    (``{"split", "varies", "members": []}``).

    Returns:
        the indices of the new persons in ``persons``.
    """
    idx: list[int] = []
    while len(idx) < n:
        size = int(min(n - len(idx), rng.choice([1, 2, 3, 4], p=[0.2, 0.3, 0.3, 0.2])))
        members, varies = _make_family(rng, size)
        fid = len(families)
        families[str(fid)] = {"split": split, "varies": varies, "members": []}
        for attrs in members:
            attrs = dict(attrs)
            persons.append({"family": fid, "attrs": attrs})
            idx.append(len(persons) - 1)
    return idx


def draw_distractor_people(
    rng: np.random.Generator,
    n: int,
    test_idx: Sequence[int],
    persons: list[dict[str, Any]],
    families: dict[str, dict[str, Any]],
) -> list[int]:
    """Append ``n`` distractor people (pid 0) to ``persons``: about half of them are new
    look-alikes of a test family (never a copy of a member), the rest unrelated people.

    Returns:
        the indices of the new persons in ``persons``.
    """
    test_fams = sorted({persons[i]["family"] for i in test_idx})
    dis_idx = []
    for _ in range(n):
        fid = int(rng.choice(test_fams))
        fam = families[str(fid)]
        attrs = None
        if fam["varies"] and rng.random() < 0.5:
            kin = [p["attrs"] for p in persons if p["family"] == fid]
            taken = {_cue_signature(a, fam["varies"]) for a in kin}
            for _try in range(20):  # a new member, never a copy of an existing one
                cand = dict(kin[0])
                for cue in fam["varies"]:
                    cand.update(_sample_cue(rng, cue, cand))
                if _cue_signature(cand, fam["varies"]) not in taken:
                    attrs = cand
                    break
        if attrs is not None:
            persons.append({"family": fid, "attrs": attrs, "pid": 0})
        else:
            persons.append({"family": None, "attrs": sample_identity(rng), "pid": 0})
        dis_idx.append(len(persons) - 1)
    return dis_idx
