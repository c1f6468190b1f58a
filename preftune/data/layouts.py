"""Layout name -> collate function ``(examples, pad_id) -> SequenceBatch`` (``engine.layout`` in the config).

    padded         one row per sequence, right-padded (the naive twin; ``collate.collate_padded``)
    shared_prompt  one row per pair: prompt, chosen, rejected (``packing.collate_shared_prompt``)
    packed         several pairs per row, block-diagonal (``packing.collate_packed``)

Kept apart from both so that neither imports the other's registry.
"""

from __future__ import annotations

from preftune.data.collate import collate_padded
from preftune.data.packing import collate_packed, collate_shared_prompt

LAYOUTS = {"padded": collate_padded, "shared_prompt": collate_shared_prompt, "packed": collate_packed}
