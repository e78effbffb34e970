"""Reward models: a Megatron-Core GPT model whose output layer is a scalar score head.

Hugging Face's `*ForSequenceClassification` with `num_labels == 1` is the format: the decoder of
the causal LM, then `score = Linear(hidden_size, 1, bias=False)` on every position, read at the
last token that is not `pad_token_id`. Here the same model is the family's GPTModel with its
output layer replaced by `ScoreHead` (`output_layer.weight`, shape [1, hidden_size]), and a
family spec derived from the causal LM's (`reward_family`): the same config fields and weight
rules, the LM head rule replaced by `score.weight`. A reward model is recognised by its
config.json alone (`architectures` ends in ForSequenceClassification), so conversion, export,
`from_checkpoint` and the trainer build it without being told.

The head is replicated on every tensor-parallel rank (one output cannot be split over TP) and
lives on the last pipeline stage. Under sequence parallelism each TP rank holds a slice of the
sequence: the head gathers the full sequence first (its backward hands each rank its slice of
the gradient, not a sum: every rank computes the same scores), so the scores, the loss and the
head's gradient are the same on every TP rank and need no reduction.

Initialisation of a new head (an LM checkpoint trained as a reward model): normal with mean 0
and standard deviation `init_method_std` (Megatron-LM's --init-method-std, 0.02 by default,
transformers' `initializer_range`, which is how `AutoModelForSequenceClassification` creates
`score` when it loads a causal-LM checkpoint and TRL's reward trainer starts), drawn from a
generator seeded with the run's seed, so that every parallel layout starts from the same head.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from megatron_patch.models.registry import family_for, supported_architectures
from megatron_patch.models.weight_rules import Rule

SEQUENCE_CLASSIFICATION = "ForSequenceClassification"


class ScoreHead(torch.nn.Module):
    """Linear(hidden_size, 1, bias=False) on every position, called as GPTModel calls its output
    layer: (hidden_states [s, b, h], weight=None, runtime_gather_output=None) -> ([s, b, 1],
    None)."""

    def __init__(self, config: Any, hidden_size: int) -> None:
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=config.params_dtype))
        if config.perform_initialization:
            generator = torch.Generator().manual_seed(torch.initial_seed())
            with torch.no_grad():
                self.weight.copy_(torch.empty(1, hidden_size).normal_(
                    0.0, config.init_method_std, generator=generator))
        # As GPTModel tags its output layer (Megatron-Core's optimizer and DDP read the tag).
        self.weight.is_embedding_or_output_parameter = True

    def forward(self, hidden_states: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None) -> tuple[torch.Tensor, None]:
        if weight is not None:
            raise ValueError("a score head has its own weight (embeddings are never tied to it)")
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False)
        return torch.nn.functional.linear(hidden_states, self.weight.to(hidden_states.dtype)), (
            None)


def is_reward_config(hf_config: dict[str, Any]) -> bool:
    """Whether an HF config.json describes a reward model (a *ForSequenceClassification)."""
    archs = hf_config.get("architectures") or []
    return bool(archs) and archs[0].endswith(SEQUENCE_CLASSIFICATION)


def _transformers_classes() -> tuple[dict[str, str], dict[str, str]]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def reward_architecture(hf_config: dict[str, Any]) -> str:
    """transformers' *ForSequenceClassification class for the model type of `hf_config`, or a
    ValueError saying why there is none (remote-code families: no model_type transformers
    knows)."""
    sequence_classes, _ = _transformers_classes()
    model_type = hf_config.get("model_type")
    arch = (hf_config.get("architectures") or ["?"])[0]
    if model_type not in sequence_classes:
        supported = ", ".join(sorted(set(sequence_classes.values()) & _registered()))
        raise ValueError(
            f"{arch} (model_type {model_type!r}) has no reward-model form: transformers has no "
            f"*ForSequenceClassification class for it (remote-code families have none), so a "
            f"reward model could not be exported nor checked against Hugging Face. Reward "
            f"models are supported for: {supported}")
    return sequence_classes[model_type]


def _registered() -> set[str]:
    """The *ForSequenceClassification classes of the registered causal-LM families."""
    sequence_classes, causal_classes = _transformers_classes()
    archs = set(supported_architectures())
    return {sequence_classes[t] for t, c in causal_classes.items()
            if c in archs and t in sequence_classes}


def reward_hf_config(hf_config: dict[str, Any], pad_token_id: int) -> dict[str, Any]:
    """The config.json of the reward model made from the causal LM of `hf_config`: its
    *ForSequenceClassification architecture, one label, and the pad token id transformers
    pools by (the last token that is not `pad_token_id` is scored)."""
    if is_reward_config(hf_config):
        return dict(hf_config)
    return {**hf_config, "architectures": [reward_architecture(hf_config)],
            "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
            "pad_token_id": pad_token_id}


def reward_family(hf_config: dict[str, Any]):
    """The FamilySpec of a reward model's config.json: its causal LM's family with the score
    head (`ScoreHead`, HF `score.weight`) in place of the LM head. Refuses configs with more
    than one label, and architectures transformers does not pair with the model type."""
    arch = hf_config["architectures"][0]
    expected = reward_architecture(hf_config)
    if arch != expected:
        raise ValueError(f"config.json architectures {arch}: transformers' sequence "
                         f"classifier for model_type {hf_config.get('model_type')!r} is "
                         f"{expected}")
    labels = len(hf_config.get("id2label") or {}) or hf_config.get("num_labels", 1)
    if labels != 1:
        raise ValueError(f"config.json of {arch}: {labels} labels (id2label); a reward model "
                         "has one (num_labels == 1)")
    _, causal_classes = _transformers_classes()
    causal = {**hf_config, "architectures": [causal_classes[hf_config["model_type"]]]}
    family = family_for(causal)
    lm_head = [r for r in family.weights if r.megatron.startswith("output_layer.")]
    return dataclasses.replace(
        family,
        architectures=(arch,),
        config_fields=tuple(f for f in family.config_fields
                            if f.megatron != "share_embeddings_and_output_weights"),
        constants={**family.constants, "score_head": True,
                   "share_embeddings_and_output_weights": False},
        # (The embedding's rule stays: only an LM head can be tied to it.)
        weights=tuple(r for r in family.weights if r not in lm_head)
        + (Rule("output_layer.weight", "score.weight"),),
    )


def check_kind(hf_config: dict[str, Any], *, reward: bool, source: str, flag: str) -> None:
    """Refuse a checkpoint of the wrong kind where a reward model (`reward`) or a language
    model is needed, naming the flag and the directory it came from."""
    arch = (hf_config.get("architectures") or ["?"])[0]
    if reward and not is_reward_config(hf_config):
        raise ValueError(f"{flag} {source}: a language model ({arch}), not a reward model; "
                         "train one from it with `megatron-patch train --train-mode rm`, or "
                         "convert an HF *ForSequenceClassification model")
    if not reward and is_reward_config(hf_config):
        raise ValueError(f"{flag} {source}: a reward model ({arch}), which scores sequences and "
                         "has no language-model head; give a language-model checkpoint")
