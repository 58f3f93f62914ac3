"""The predictor: fairseq's RoBERTa encoder, with fewer host-device syncs per forward.

Same modules and parameter names as `RobertaEncoder` (so `amt` checkpoints minus `masker.*`
are stock `roberta` checkpoints); only the forward changes, in two places where fairseq reads
device values back to the host:

- fairseq's `TransformerEncoder` tests `encoder_padding_mask.any()` once per layer (a sync
  each: 12 for RoBERTa-base). Here the caller may say whether the batch is padded (the
  criterion knows it from the batch's token count, for free); otherwise it is read once.
  An unpadded batch runs attention without a mask, which lets SDPA pick flash attention.
- `RobertaLMHead` selects the masked positions with a boolean mask, which syncs in the
  forward and again in the backward. `masked_tokens` may also be a 1-D tensor of flat
  positions (row-major over (B, T)), selected with index_select: no sync in either pass.

and in two places where fairseq's layer spends memory bandwidth under mixed precision:

- fairseq's `gelu` upcasts its input to fp32 and back (`gelu(x.float()).type_as(x)`): two
  extra passes over the largest activation, (B, T, 4C), and an fp32 copy of it kept for the
  backward. torch's GELU on bf16 / fp16 already computes in fp32 internally and rounds once,
  which is the same number.
- Self-attention goes through torch's `multi_head_attention_forward` with three separate
  projections, so under autocast the input is cast to bf16 three times and three GEMMs run.
  `SelfAttention` projects q, k and v in one GEMM over the concatenated weights (the module
  keeps `q_proj`, `k_proj`, `v_proj`, so the state dict does not change) and calls
  `scaled_dot_product_attention` on (B, heads, T, C / heads) views.

On CPUs its dropout, attention dropout included, is `cpu_dropout`'s (3x faster than torch's
there; no state, so checkpoints do not change).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from fairseq.distributed import fsdp_wrap
from fairseq.models.roberta.model import RobertaEncoder
from fairseq.models.transformer import TransformerConfig, TransformerEncoder
from fairseq.modules import MultiheadAttention
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.modules.gelu import gelu as fairseq_gelu
from fairseq.modules.transformer_layer import TransformerEncoderLayerBase
from fairseq.modules.transformer_sentence_encoder import init_bert_params
from torch import Tensor

from . import cpu_dropout


class SelfAttention(MultiheadAttention):
    """fairseq's MultiheadAttention, same parameters; encoder self-attention in one QKV GEMM
    and one SDPA call. Every other use (incremental state, attention weights, quant noise,
    an attention mask, xformers) goes to fairseq's forward."""

    def forward(self, query, key, value, key_padding_mask=None, incremental_state=None,
                need_weights=True, static_kv=False, attn_mask=None, before_softmax=False,
                need_head_weights=False):
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if (incremental_state is not None or need_weights or need_head_weights or static_kv
                or attn_mask is not None or before_softmax or key is not query
                or value is not query or self.bias_k is not None or self.add_zero_attn
                or self.onnx_trace or self.skip_embed_dim_check or query.device.type == "xla"
                or getattr(self, "use_xformers", False)
                or any(m._forward_pre_hooks for m in projections)):
            return super().forward(query, key, value, key_padding_mask, incremental_state,
                                   need_weights, static_kv, attn_mask, before_softmax,
                                   need_head_weights)
        T, B, C = query.shape
        H = self.num_heads
        weight = torch.cat([m.weight for m in projections])  # (3C, C)
        bias = torch.cat([m.bias for m in projections]) if self.q_proj.bias is not None \
            else None
        qkv = F.linear(query, weight, bias)  # (T, B, 3C)
        # (T, B, 3, H, C / H) -> three (B, H, T, C / H) views
        q, k, v = qkv.view(T, B, 3, H, C // H).permute(2, 1, 3, 0, 4).unbind(0)
        attend = None
        if key_padding_mask is not None:  # fairseq: True = padding; SDPA: True = attend
            attend = ~key_padding_mask.bool().view(B, 1, 1, T)
        p = self.dropout_module.p
        p = p if self.training or self.dropout_module.apply_during_inference else 0.0
        y = cpu_dropout.attention(q, k, v, attend, p)  # SDPA (on CPUs with dropout: see it)
        y = y.permute(2, 0, 1, 3).reshape(T, B, C)  # (B, H, T, C / H) -> (T, B, C)
        return self.out_proj(y), None


class PredictorLayer(TransformerEncoderLayerBase):
    """fairseq's encoder layer with `SelfAttention` and torch's GELU (see module doc)."""

    def __init__(self, cfg, return_fc: bool = False) -> None:
        super().__init__(cfg, return_fc=return_fc)
        if self.activation_fn is fairseq_gelu:
            self.activation_fn = F.gelu

    def build_self_attention(self, embed_dim, cfg):
        return SelfAttention(
            embed_dim, cfg.encoder.attention_heads, dropout=cfg.attention_dropout,
            self_attention=True, q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
            xformers_att_config=cfg.encoder.xformers_att_config,
        )


class PaddingAwareTransformerEncoder(TransformerEncoder):
    """fairseq's TransformerEncoder; `padded` decided once per forward, not once per layer;
    its layers are `PredictorLayer`s."""

    def build_encoder_layer(self, args):
        # fairseq's TransformerEncoderBase.build_encoder_layer, with our layer class
        cfg = TransformerConfig.from_namespace(args)
        layer = PredictorLayer(cfg, return_fc=self.return_fc)
        checkpoint = cfg.checkpoint_activations
        if checkpoint:
            layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
        return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not checkpoint else 0)

    def forward(
        self,
        src_tokens: Tensor,
        src_lengths: Optional[Tensor] = None,
        return_all_hiddens: bool = False,
        token_embeddings: Optional[Tensor] = None,
        padded: Optional[bool] = None,
    ):
        padding_mask = src_tokens.eq(self.padding_idx)
        if padded is None:
            padded = bool(padding_mask.any())
        x, embedding = self.forward_embedding(src_tokens, token_embeddings)
        if padded:
            x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
        # B x T x C -> T x B x C, contiguous: every layer then sees the same strides (one
        # compiled graph for all of them under --torch-compile)
        x = x.transpose(0, 1).contiguous()
        states = [x] if return_all_hiddens else []
        fc_results = []
        for layer in self.layers:
            out = layer(x, encoder_padding_mask=padding_mask if padded else None)
            x, fc = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
            if return_all_hiddens:
                states.append(x)
                fc_results.append(fc)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        lengths = (~padding_mask).sum(dim=1, dtype=torch.int32).reshape(-1, 1)
        return {  # the same dictionary as fairseq's
            "encoder_out": [x],  # T x B x C
            "encoder_padding_mask": [padding_mask],  # B x T
            "encoder_embedding": [embedding],  # B x T x C
            "encoder_states": states,  # List[T x B x C]
            "fc_results": fc_results,
            "src_tokens": [],
            "src_lengths": [lengths],
        }


class PredictorEncoder(RobertaEncoder):
    """RobertaEncoder taking `padded` and flat-position `masked_tokens`; see module doc."""

    def __init__(self, args, dictionary) -> None:
        super().__init__(args, dictionary)
        if self.lm_head.activation_fn is fairseq_gelu:
            self.lm_head.activation_fn = F.gelu
        cpu_dropout.use_cpu_dropout(self)

    def build_encoder(self, args, dictionary, embed_tokens):
        encoder = PaddingAwareTransformerEncoder(args, dictionary, embed_tokens)
        encoder.apply(init_bert_params)
        return encoder

    def forward(
        self,
        src_tokens: Tensor,
        features_only: bool = False,
        return_all_hiddens: bool = False,
        masked_tokens: Optional[Tensor] = None,
        padded: Optional[bool] = None,
        **unused,
    ):
        x, extra = self.extract_features(src_tokens, return_all_hiddens, padded=padded)
        if not features_only:
            x = self.output_layer(x, masked_tokens=masked_tokens)
        return x, extra

    def extract_features(self, src_tokens, return_all_hiddens=False, padded=None, **kwargs):
        encoder_out = self.sentence_encoder(
            src_tokens, return_all_hiddens=return_all_hiddens,
            token_embeddings=kwargs.get("token_embeddings"), padded=padded,
        )
        features = encoder_out["encoder_out"][0].transpose(0, 1)  # T x B x C -> B x T x C
        inner_states = encoder_out["encoder_states"] if return_all_hiddens else None
        return features, {"inner_states": inner_states}

    def output_layer(self, features, masked_tokens=None, **unused):
        if masked_tokens is not None and masked_tokens.dtype != torch.bool:
            # flat positions (M,) over (B, T): (B, T, C) -> (M, C) without a sync
            features = features.flatten(0, 1).index_select(0, masked_tokens)
            masked_tokens = None
        return self.lm_head(features, masked_tokens)
