"""Model `amt`: a masker and a predictor in one fairseq model.

The predictor *is* fairseq's RoBERTa (encoder + LM head, under the same parameter names), so
dropping the `masker.*` keys from an `amt` state dict leaves a stock `roberta` state dict.
The masker sits beside it under `masker.*`. Each parameter carries a `param_group` tag,
"predictor" or "masker", which the optimizer (`amt_adam`, or fairseq's `composite`) uses to
give each role its own learning rate and to step one role without moving the other.

`forward` is RoBERTa's forward (the predictor, `predictor.PredictorEncoder`: RoBERTa's modules
with fewer host-device syncs); the criterion calls `model.masker(tokens)` separately, so one
training step is: masker -> choose positions -> corrupt -> predictor.
"""

from __future__ import annotations

from fairseq.models import (
    BaseFairseqModel,
    FairseqEncoder,
    register_model,
    register_model_architecture,
)
from fairseq.models.roberta import RobertaModel
from fairseq.models.roberta.model import base_architecture as roberta_base_architecture
from fairseq.models.roberta.model import roberta_large_architecture
from fairseq.utils import safe_getattr, safe_hasattr
from omegaconf import OmegaConf

from .masker import Masker
from .predictor import PredictorEncoder

MASKER = "masker"
PREDICTOR = "predictor"


@register_model("amt")
class AMTModel(RobertaModel):
    """RoBERTa predictor (`encoder.*`, `classification_heads.*`) + masker (`masker.*`)."""

    def __init__(self, args, encoder) -> None:
        super().__init__(args, encoder)
        for p in self.parameters():
            p.param_group = PREDICTOR
        self.masker = Masker(
            vocab_size=len(encoder.dictionary),
            padding_idx=encoder.dictionary.pad(),
            max_positions=args.max_positions,
            embed_dim=args.masker_embed_dim,
            ffn_dim=args.masker_ffn_embed_dim,
            layers=args.masker_layers,
            heads=args.masker_attention_heads,
            dropout=args.masker_dropout,
        )
        for p in self.masker.parameters():
            p.param_group = MASKER

    @staticmethod
    def add_args(parser) -> None:
        RobertaModel.add_args(parser)
        parser.add_argument("--masker-layers", type=int, metavar="L",
                            help="Transformer layers in the masker (default 2)")
        parser.add_argument("--masker-embed-dim", type=int, metavar="D",
                            help="masker width (default: a quarter of --encoder-embed-dim)")
        parser.add_argument("--masker-ffn-embed-dim", type=int, metavar="D",
                            help="masker feed-forward width (default: 4x --masker-embed-dim)")
        parser.add_argument("--masker-attention-heads", type=int, metavar="H",
                            help="masker attention heads (default: one per 64 dims)")
        parser.add_argument("--masker-dropout", type=float, metavar="P",
                            help="dropout inside the masker (default 0: a deterministic policy)")

    @classmethod
    def build_model(cls, args, task):
        # RobertaModel.build_model, with the predictor's encoder swapped for the sync-lean
        # PredictorEncoder (same modules, same parameter names)
        if OmegaConf.is_config(args):
            OmegaConf.set_struct(args, False)
        base_architecture(args)
        if not safe_hasattr(args, "max_positions"):
            if not safe_hasattr(args, "tokens_per_sample"):
                args.tokens_per_sample = task.max_positions()
            args.max_positions = args.tokens_per_sample
        encoder = PredictorEncoder(args, task.source_dictionary)
        if OmegaConf.is_config(args):
            OmegaConf.set_struct(args, True)
        return cls(args, encoder)

    # Host time per update: at small shapes a GPU waits for the host, and fairseq's per-update
    # bookkeeping walks the whole module tree several times. Two of those walks are cut here.

    def train(self, mode: bool = True):
        """nn.Module.train, skipped when every module is in that mode already: the trainer
        and the task switch the model to training on every update, and setting the flag
        on each module costs several times more host time than checking it. The modules
        are listed once (walking the tree for them costs most of the check): a module
        added to the model after the first call is switched only along with the others."""
        modules = self.__dict__.get("_all_modules")
        if modules is None:
            modules = self.__dict__["_all_modules"] = list(self.modules())
        if all(m.training == mode for m in modules):
            return self
        return super().train(mode)

    def set_num_updates(self, num_updates: int) -> None:
        """fairseq's version walks every module on every update, and each FairseqEncoder in
        the tree walks its own subtree again, for modules that ignore the number. Here the
        modules with a set_num_updates of their own are found once and called directly.
        (Found at the first update: a module added to the model later is not called.)"""
        listeners = self.__dict__.get("_update_listeners")
        if listeners is None:
            walkers = (BaseFairseqModel.set_num_updates, FairseqEncoder.set_num_updates)
            listeners = [m for m in self.modules() if m is not self and getattr(
                type(m), "set_num_updates", None) not in (None, *walkers)]
            self.__dict__["_update_listeners"] = listeners
        for m in listeners:
            m.set_num_updates(num_updates)

    def compile_blocks(self, mode: str = "default") -> None:
        """torch.compile every predictor layer, in place, in torch.compile's `mode`
        (reduce-overhead: each block replays as a CUDA graph), and record the mode in
        `compile_mode`: the criterion then compiles the masker together with its draw.

        In place (`Module.compile`), so parameter names and checkpoints do not change. The
        LM head stays eager: its input size (the masked positions) changes every batch.
        """
        self.compile_mode = mode
        for layer in self.encoder.sentence_encoder.layers:
            layer.compile(mode=None if mode == "default" else mode)

    def predictor_state_dict(self) -> dict:
        """The predictor alone: exactly the keys of a fairseq `roberta` model."""
        prefix = MASKER + "."
        return {k: v for k, v in self.state_dict().items() if not k.startswith(prefix)}


def base_architecture(args) -> None:
    """Defaults for every amt_* architecture: RoBERTa's, plus the masker's."""
    roberta_base_architecture(args)
    args.masker_layers = safe_getattr(args, "masker_layers", 2)
    args.masker_embed_dim = safe_getattr(args, "masker_embed_dim", args.encoder_embed_dim // 4)
    args.masker_ffn_embed_dim = safe_getattr(
        args, "masker_ffn_embed_dim", 4 * args.masker_embed_dim
    )
    args.masker_attention_heads = safe_getattr(
        args, "masker_attention_heads", max(1, args.masker_embed_dim // 64)
    )
    args.masker_dropout = safe_getattr(args, "masker_dropout", 0.0)


@register_model_architecture("amt", "amt_tiny")
def amt_tiny(args) -> None:
    """Seconds on a CPU: what tests and try-outs use. Predictor 2 x 128, masker 2 x 32."""
    args.encoder_layers = safe_getattr(args, "encoder_layers", 2)
    args.encoder_embed_dim = safe_getattr(args, "encoder_embed_dim", 128)
    args.encoder_ffn_embed_dim = safe_getattr(args, "encoder_ffn_embed_dim", 512)
    args.encoder_attention_heads = safe_getattr(args, "encoder_attention_heads", 2)
    args.max_positions = safe_getattr(args, "max_positions", 512)
    base_architecture(args)


@register_model_architecture("amt", "amt_small")
def amt_small(args) -> None:
    """ELECTRA-Small-like predictor: 12 layers, 256 wide, 4 heads, FFN 1024. Masker 2 x 64."""
    args.encoder_layers = safe_getattr(args, "encoder_layers", 12)
    args.encoder_embed_dim = safe_getattr(args, "encoder_embed_dim", 256)
    args.encoder_ffn_embed_dim = safe_getattr(args, "encoder_ffn_embed_dim", 1024)
    args.encoder_attention_heads = safe_getattr(args, "encoder_attention_heads", 4)
    base_architecture(args)


@register_model_architecture("amt", "amt_base")
def amt_base(args) -> None:
    """RoBERTa-base predictor (12 x 768, 12 heads). Masker 2 x 192, 3 heads."""
    base_architecture(args)


@register_model_architecture("amt", "amt_large")
def amt_large(args) -> None:
    """RoBERTa-large predictor (24 x 1024, 16 heads). Masker 2 x 256, 4 heads."""
    roberta_large_architecture(args)
    base_architecture(args)
