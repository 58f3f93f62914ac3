"""Fixed-mask metrics for any masked-LM checkpoint: AMT, or stock fairseq RoBERTa / masked_lm.

    python scripts/evaluate_checkpoint.py CHECKPOINT --data BIN [--subset valid] [--json OUT]

Scores the predictor on the *fixed* uniformly random 15% mask (seeded per sample: the same
positions for a sample in every run; each scored token's input is <mask>), overall and per
frequency bucket, beside the context-free reference (the training split's unigram model on the
same positions), exactly as `fairseq-validate` does for AMT checkpoints; so runs made without
the plugin can be compared with AMT runs. Prints one JSON object (and writes it to --json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import amt_plugin  # noqa: E402,F401
from amt_plugin.criterions.adversarial_masked_lm import (  # noqa: E402
    AdversarialMaskedLMCriterion,
    AdversarialMaskedLMCriterionConfig,
)
from amt_plugin.tasks.adversarial_masked_lm import (  # noqa: E402
    AdversarialMaskedLMConfig,
    AdversarialMaskedLMTask,
)


def evaluate(checkpoint: Path, data: Path, subset: str = "valid", batch_size: int = 32,
             cpu: bool = True, fixed_mask_seed: int = 0) -> dict[str, float]:
    from fairseq import checkpoint_utils, metrics, utils

    models, cfg = checkpoint_utils.load_model_ensemble([str(checkpoint)],
                                                       arg_overrides={"data": str(data)})
    model = models[0].eval()
    use_cuda = torch.cuda.is_available() and not cpu
    if use_cuda:
        model.cuda()
    saved = cfg.task
    task_cfg = AdversarialMaskedLMConfig(
        data=str(data), tokens_per_sample=saved.tokens_per_sample,
        sample_break_mode=saved.sample_break_mode, mask_prob=saved.mask_prob,
        leave_unmasked_prob=saved.leave_unmasked_prob,
        random_token_prob=saved.random_token_prob, seed=1,
        masking_strategy="learned" if hasattr(model, "masker") else "random",
    )
    task = AdversarialMaskedLMTask.setup_task(task_cfg)
    criterion = AdversarialMaskedLMCriterion(
        AdversarialMaskedLMCriterionConfig(seed=1, fixed_mask_seed=fixed_mask_seed), task)
    if use_cuda:
        criterion.cuda()
    task.load_dataset(subset)
    # batched as fairseq-validate batches by default, so the two report the same numbers (the
    # fixed-mask metrics do not depend on batching; the strategy's own masks are drawn per batch)
    batches = task.get_batch_iterator(
        dataset=task.dataset(subset), max_sentences=batch_size,
        max_positions=task.max_positions(), ignore_invalid_inputs=True,
        required_batch_size_multiple=8,
    ).next_epoch_itr(shuffle=False)
    logs = []
    with torch.no_grad():
        for sample in batches:
            sample = utils.move_to_cuda(sample) if use_cuda else sample
            logs.append(criterion(model, sample)[2])
    with metrics.aggregate(new_root=True) as agg:
        criterion.reduce_metrics(logs)
        values = agg.get_smoothed_values()
    keep = ("fixed_mask", "loss")
    return {k: float(v) for k, v in values.items() if k.startswith(keep)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="binarized data (dict.txt)")
    parser.add_argument("--subset", default="valid")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fixed-mask-seed", type=int, default=0)
    parser.add_argument("--gpu", action="store_true", help="run on the GPU if there is one")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    result = evaluate(args.checkpoint, args.data, args.subset, args.batch_size,
                      cpu=not args.gpu, fixed_mask_seed=args.fixed_mask_seed)
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
