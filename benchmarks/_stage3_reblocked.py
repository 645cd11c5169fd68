"""Stage 3 exactly as `03_dpo_train/train.py`, plus one change under test (not a fix applied to common/):

the tokenised pairs are re-split into `num_devices * num_data_blocks_per_device` blocks before they reach the
reference actor pool. Today `common.dpo.tokenize_pairs` creates that many blocks and then tokenises them with
`map_batches(batch_size=64)`, which bundles every block of <= 64 rows into one task, i.e. one block: the reference
pool gets the whole epoch as a single block and the trainer's first batch waits for the whole reference pass. The
proposed fix is `batch_size=None` there (one batch per block); this runner emulates it by re-blocking the
materialised result with `ray.data.from_items(..., override_num_blocks=N)`, which is what the cached path
(`common.dpo._with_cached_logps`) already does. Usage: same arguments as 03_dpo_train/train.py.
"""
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import common.dpo as D  # noqa: E402

_original = D.tokenize_pairs


def tokenize_pairs_reblocked(pairs, cfg, tokenizer_path, where):
    import ray

    kept, drops = _original(pairs, cfg, tokenizer_path, where)
    rows = kept.take_all()
    n = max(1, min(len(rows), cfg.num_devices * cfg.num_data_blocks_per_device))
    print(f"[bench] reference pool input re-split: {kept.num_blocks()} block(s) -> {n}", flush=True)
    return ray.data.from_items(rows, override_num_blocks=n).materialize(), drops


D.tokenize_pairs = tokenize_pairs_reblocked  # 03_dpo_train/train.py imports it from common.dpo below
sys.argv[0] = str(REPO / "03_dpo_train" / "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
