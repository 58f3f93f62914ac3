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
"""

from __future__ import annotations

from typing import Optional

import torch
from fairseq.models.roberta.model import RobertaEncoder
from fairseq.models.transformer import TransformerEncoder
from fairseq.modules.transformer_sentence_encoder import init_bert_params
from torch import Tensor


class PaddingAwareTransformerEncoder(TransformerEncoder):
    """fairseq's TransformerEncoder; `padded` decided once per forward, not once per layer."""

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
