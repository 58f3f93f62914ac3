"""AMT's predictor against fairseq's RobertaEncoder: one forward + backward, same weights.

    python benchmarks/predictor_step.py [--arch amt_small] [--batch 8] [--tokens 512]

The two encoders hold the same parameters under the same names; AMT's differs in its
forward only (one QKV GEMM, torch's GELU on the half-precision activation, no per-layer
padding check, flat-position LM head). Both run the same batch (15% of positions through
the LM head), in fp32 and under bf16 autocast, alternating, on the GPU when there is one.
Reported: median milliseconds per forward + backward and the ratio AMT / fairseq (below 1:
AMT is faster), and peak memory on a GPU. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def encoders(arch: str, tokens: int, vocab: int, device: str):
    """(AMT's predictor, fairseq's RobertaEncoder with the same weights)."""
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_CONFIG_REGISTRY
    from fairseq.models.roberta.model import RobertaEncoder

    from amt_plugin.models.amt import AMTModel
    from amt_plugin.tasks.adversarial_masked_lm import (
        AdversarialMaskedLMConfig,
        AdversarialMaskedLMTask,
    )

    d = Dictionary()
    for i in range(vocab):
        d.add_symbol(f"w{i}")
    task = AdversarialMaskedLMTask(AdversarialMaskedLMConfig(data="unused"), d)
    args = argparse.Namespace(arch=arch, max_positions=tokens)
    ARCH_CONFIG_REGISTRY[arch](args)
    ours = AMTModel.build_model(args, task).encoder
    stock = RobertaEncoder(copy.deepcopy(ours.args), d)
    stock.load_state_dict(ours.state_dict())
    return ours.to(device).train(), stock.to(device).train(), len(d)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="amt_small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--vocab", type=int, default=30000)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ours, stock, V = encoders(args.arch, args.tokens, args.vocab, device)
    tokens = torch.randint(4, V, (args.batch, args.tokens), device=device)
    tokens[:, 0] = 0  # <s>
    mask = torch.rand(tokens.shape, device=device) < 0.15
    flat = mask.flatten().nonzero().squeeze(1)
    targets = tokens[mask]

    def step(net, precision: str) -> float:
        """Seconds for one forward + backward."""
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            if net is ours:
                logits = net(tokens, masked_tokens=flat, padded=False)[0]
            else:
                logits = net(tokens, masked_tokens=mask)[0]
            loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    print(f"\n{args.arch}, {args.batch} x {args.tokens} tokens, vocabulary {V}, {device}, "
          f"median of {args.repeats} alternating runs\n")
    print("| precision | fairseq RobertaEncoder (ms) | AMT predictor (ms) | AMT / fairseq |"
          + (" peak GiB fairseq / AMT |" if device == "cuda" else ""))
    print("|---|---|---|---|" + ("---|" if device == "cuda" else ""))
    for precision in ("fp32", "bf16"):
        times: dict = {"ours": [], "stock": []}
        peak = {}
        for name, net in (("ours", ours), ("stock", stock)):  # warm-up, and peak memory
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step(net, precision)
            if device == "cuda":
                peak[name] = torch.cuda.max_memory_allocated() / 2**30
        for _ in range(args.repeats):
            for name, net in (("ours", ours), ("stock", stock)):
                net.zero_grad(set_to_none=True)
                times[name].append(step(net, precision))
        a, b = (1e3 * statistics.median(times[k]) for k in ("stock", "ours"))
        memory = f" {peak['stock']:.2f} / {peak['ours']:.2f} |" if peak else ""
        print(f"| {precision} | {a:.1f} | {b:.1f} | {b / a:.2f} |{memory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
