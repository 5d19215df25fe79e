"""``synth_render``: the synthetic set rendered on the fly (no files; docs/pretrain.md).

Its records are :class:`~reidkit.data.synth.online.RenderedRecords`: the loaders render
each image in their workers from ``(data.render, index)``.
"""

from __future__ import annotations

import os
from typing import Any

from reidkit.data.datasets.base import LoadOptions, ParsedDataset

__all__ = ["load_synth_render"]


def load_synth_render(
    root: str | os.PathLike,
    opts: LoadOptions,
    render: Any = None,
    height: int = 128,
    width: int = 64,
) -> ParsedDataset:
    """The on-the-fly synthetic set described by ``render`` (a
    :class:`~reidkit.data.synth.knobs.SynthRenderConfig`, a dict of its knobs, or ``None``
    for the default preset), rendered at ``height x width`` unless the knobs fix a size.
    ``root`` is not read (nothing is on disk); the file checks of ``opts`` do not apply.
    """
    from reidkit.data.synth.knobs import SynthRenderConfig
    from reidkit.data.synth.online import SynthRenderSource

    if render is None:
        render = SynthRenderConfig()
    elif isinstance(render, dict):
        render = SynthRenderConfig.model_validate(render)
    source = SynthRenderSource(render, height, width)
    splits = {split: source.records(split) for split in ("train", "query", "gallery")}
    return ParsedDataset(
        name="synth_render",
        root=str(root),
        train=splits["train"],  # type: ignore[arg-type]
        query=splits["query"],  # type: ignore[arg-type]
        gallery=splits["gallery"],  # type: ignore[arg-type]
        notes=[
            f"rendered on the fly: preset '{render.preset}' (plan {render.plan}), render seed "
            f"{render.seed}, {source.height}x{source.width}"
        ],
        dataset_dir=source.name,
    )
