"""``dq.compare``: the side-by-side table of model variants (16-bit, plain 4-bit, dynamic 4-bit).

Per variant: measured footprint, next-token KL divergence to the reference over the reference
answers' tokens (mean ± standard error, p99), top-1 agreement, perplexity of the reference answers
(teacher-forced), the share of the plain 4-bit KL gap it closes, and its greedy answer to every sample.

Example:
    >>> import dq_kit as dq
    >>> processor = dq.tiny.tiny_processor("llama")
    >>> m16 = dq.tiny.build_tiny_model("llama")
    >>> m4 = dq.quantize(dq.tiny.build_tiny_model("llama"), dq.Plan.uniform(m16))
    >>> samples = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes, it is."}]}]
    >>> result = dq.compare({"16bit": m16, "4bit": m4}, processor, samples, max_new_tokens=4)
    >>> result.summary["variant"].tolist()
    ['16bit', '4bit']
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arguments import processor_second
from ..data.chat import EncodedChat, encode_answer, tokenizer_of
from ..errors import DQError
from ..files import Output, read_json, save_json
from ..progress import progress_bar
from ..quant.memory import loaded_bytes
from ..quant.verification import is_quantized
from ..units import GIB
from .generation import generate_from_inputs

RESULT_FORMAT = "dq_kit.comparison"
SUMMARY_COLUMNS = ["variant", "GiB", "KL mean", "KL se", "KL p99", "top-1 agreement %", "perplexity", "gap closed %"]


@dataclass
class ComparisonResult:
    """What :func:`compare` measured.

    Attributes:
        summary: one row per variant: ``variant``, ``GiB`` (measured, live dtype), ``KL mean``,
            ``KL se``, ``KL p99`` (nats per answer token, vs the reference), ``top-1 agreement %``,
            ``perplexity`` (of the reference answers), ``gap closed %`` (share of the ``"4bit"``
            variant's mean KL removed; NaN without a ``"4bit"`` variant).
        answers: one row per sample: ``question``, ``expected`` (the reference answer), then each
            variant's greedy answer.
        reference: name of the reference variant.
        descriptions: per variant, how it is quantized (``"16-bit (float32)"``, ``"NF4, 3 modules 16-bit"``).
    """

    summary: Any
    answers: Any
    reference: str
    descriptions: dict[str, str] = field(default_factory=dict)

    def to_html(self) -> str:
        """The published-style table ("Description | Size | Result") per sample, under the metrics.

        Answers identical to the reference variant's are marked ✓, the others ✗.

        Example:
            >>> import dq_kit as dq
            >>> sample = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]}
            >>> result = dq.compare({"16bit": dq.tiny.build_tiny_model("llama")}, dq.tiny.tiny_processor("llama"), [sample], 2)
            >>> "<th>Description</th><th>Size</th><th>Result</th>" in result.to_html()
            True
        """
        variants = self.summary["variant"].tolist()
        sizes = dict(zip(variants, self.summary["GiB"], strict=True))
        metrics = self.summary.set_index("variant")
        parts = [f"<h4>Variants compared with <b>{html.escape(self.reference)}</b></h4>", self.summary.to_html(index=False, float_format=_fmt)]
        for index, row in self.answers.iterrows():
            reference_answer = row[self.reference]
            rows = []
            for variant in variants:
                answer = row[variant]
                mark = "" if variant == self.reference else (" ✓" if answer == reference_answer else " ✗")
                kl = metrics.loc[variant, "KL mean"]
                rows.append(
                    f"<tr><td><b>{html.escape(variant)}</b><br>{html.escape(self.descriptions.get(variant, ''))}"
                    f"<br><small>KL {_fmt(kl)}, top-1 {_fmt(metrics.loc[variant, 'top-1 agreement %'])}%</small></td>"
                    f"<td>{_fmt(sizes[variant])} GiB</td><td>{html.escape(answer)}{mark}</td></tr>"
                )
            parts.append(
                f"<p><b>Sample {index}</b>: {html.escape(row['question'])}<br><i>expected:</i> {html.escape(row['expected'])}</p>"
                "<table><thead><tr><th>Description</th><th>Size</th><th>Result</th></tr></thead><tbody>"
                + "".join(rows)
                + "</tbody></table>"
            )
        return "\n".join(parts)

    def _repr_html_(self) -> str:
        return self.to_html()

    def __str__(self) -> str:
        """The metrics table, then how many answers of each variant differ from the reference's."""
        flips = {v: int((self.answers[v] != self.answers[self.reference]).sum()) for v in self.summary["variant"] if v != self.reference}
        lines = [f"Variants compared with {self.reference} on {len(self.answers)} sample(s):",
                 self.summary.to_string(index=False, float_format=_fmt)]
        lines += [f"  {variant}: {count} of {len(self.answers)} answer(s) differ from {self.reference}'s" for variant, count in flips.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the on-disk format); NaN becomes ``null``."""
        return {
            "format": RESULT_FORMAT,
            "version": 1,
            "reference": self.reference,
            "descriptions": self.descriptions,
            "summary": _records(self.summary),
            "answers": _records(self.answers.reset_index(names="sample")),
        }

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the result as JSON (atomically); an existing file is replaced only when it is a dq_kit
        comparison, or with ``overwrite=True``.

        Example:
            >>> import dq_kit as dq
            >>> sample = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]}
            >>> result = dq.compare({"16bit": dq.tiny.build_tiny_model("llama")}, dq.tiny.tiny_processor("llama"), [sample], 2)
            >>> import tempfile
            >>> path = result.save(tempfile.mkdtemp() + "/comparison.json")
            >>> ComparisonResult.load(path).reference
            '16bit'
        """
        return save_json(path, self.to_dict(), Output("dq_kit comparison", file_format=RESULT_FORMAT), overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ComparisonResult:
        """Read a result written by :meth:`save` (example there)."""
        import pandas as pd

        data = read_json(path, "Comparison")
        if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
            raise DQError(f"{path} is not a dq_kit comparison (expected \"format\": \"{RESULT_FORMAT}\").")
        summary = pd.DataFrame(data["summary"], columns=SUMMARY_COLUMNS).astype({c: float for c in SUMMARY_COLUMNS[1:]})
        answers = pd.DataFrame(data["answers"]).set_index("sample")
        return cls(summary=summary, answers=answers, reference=data["reference"], descriptions=data.get("descriptions", {}))


def compare(
    variants: Mapping[str, nn.Module],
    processor: Any,
    samples: Sequence[Mapping[str, Any]],
    max_new_tokens: int = 32,
    *,
    progress: bool | None = None,
) -> ComparisonResult:
    """Compare model variants on chat samples against a reference variant.

    The reference is the variant named ``"16bit"``, else the first. Metrics are over the tokens of
    each sample's reference answer (its last assistant turn, end-of-turn token included), teacher-
    forced: KL(reference ‖ variant) of the next-token distributions in nats, whether the top tokens
    agree, and the perplexity of the reference answer. Each variant also answers every sample
    greedily (``max_new_tokens``). ``GiB`` is :func:`dq_kit.quant.memory.loaded_bytes` of the model as it
    sits in memory, in its live dtype (a "16-bit" model loaded in float32 on a CPU counts 4 bytes
    per parameter).

    Args:
        variants: name -> model, e.g. ``{"16bit": m16, "4bit": m4, "dynamic": md}``; same architecture
            and vocabulary. With a ``"4bit"`` variant, ``gap closed %`` is reported.
        processor: the processor (VLM) or tokenizer (LM) shared by the variants. Second, as in every
            dq_kit function (``compare(variants, samples, processor)`` still works, with a ``FutureWarning``).
        samples: ``{"messages": [user..., assistant...], "images": [PIL images or paths]}`` dicts.
        max_new_tokens: length limit of the generated answers.

    Raises:
        DQError: no variants or samples, variants of different architectures or vocabularies, or a
            sample without an assistant answer (the message names the sample).

    Example:
        >>> import dq_kit as dq
        >>> m16, processor = dq.load(dq.tiny.save_tiny("qwen2_vl", "/tmp/tiny-qwen2-vl"), quant="16bit")
        >>> md = dq.quantize(dq.load("/tmp/tiny-qwen2-vl", quant="16bit", processor=False)[0])
        >>> sample = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]},
        ...                        {"role": "assistant", "content": "A red square."}], "images": [dq.tiny.tiny_image(1)]}
        >>> dq.compare({"16bit": m16, "dynamic": md}, processor, [sample]).summary.shape
        (2, 8)
    """
    processor, samples = processor_second(processor, samples, "compare", "samples", first="variants")
    reference = _check_variants(variants)
    if not samples:
        raise DQError("No samples to compare on: pass a non-empty list of chat samples.")
    encoded = [encode_answer(processor, sample, name=f"sample {i}") for i, sample in enumerate(samples)]
    tokenizer = tokenizer_of(processor)
    stats = {name: _TokenStats() for name in variants}
    answers: dict[str, list[str]] = {name: [] for name in variants}
    for chat in progress_bar(encoded, progress, "Comparing variants", unit="sample"):
        reference_logprobs = _answer_logprobs(variants[reference], chat)
        for name, model in variants.items():
            logprobs = reference_logprobs if name == reference else _answer_logprobs(model, chat)
            stats[name].add(reference_logprobs, logprobs, chat.full["input_ids"][0, chat.answer_start : chat.answer_end])
            with torch.inference_mode():
                answers[name].append(generate_from_inputs(model, tokenizer, chat.prompt, max_new_tokens)[0])
    return _result(variants, reference, stats, answers, encoded)


def _check_variants(variants: Mapping[str, nn.Module]) -> str:
    if not variants:
        raise DQError("No variants to compare: pass e.g. {'16bit': m16, '4bit': m4, 'dynamic': md}.")
    signatures = {name: _signature(model) for name, model in variants.items()}
    if len(set(signatures.values())) > 1:
        shown = ", ".join(f"{name}: {kind} with vocabulary {vocab}" for name, (kind, vocab) in signatures.items())
        raise DQError(f"The variants must be the same model in different precisions, but they differ ({shown}).")
    return "16bit" if "16bit" in variants else next(iter(variants))


def _signature(model: nn.Module) -> tuple[str, int]:
    config = getattr(model, "config", None)
    if config is None:
        raise DQError(f"Variants must be transformers models, got {type(model).__name__}.")
    return str(config.model_type), int(config.get_text_config().vocab_size)


@torch.inference_mode()
def _answer_logprobs(model: nn.Module, chat: EncodedChat) -> torch.Tensor:
    """float32 log-probabilities the model gives each answer position, teacher-forced (tokens x vocab)."""
    logits = model(**chat.full.to(model.device)).logits[0, chat.answer_start - 1 : chat.answer_end - 1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


class _TokenStats:
    """Per-token KL, top-1 agreement and answer log-likelihood of one variant, over all samples."""

    def __init__(self) -> None:
        self.kl: list[torch.Tensor] = []
        self.agree: list[torch.Tensor] = []
        self.nll: list[torch.Tensor] = []

    def add(self, reference: torch.Tensor, logprobs: torch.Tensor, targets: torch.Tensor) -> None:
        self.kl.append((reference.exp() * (reference - logprobs)).sum(-1).clamp_min(0))
        self.agree.append(reference.argmax(-1) == logprobs.argmax(-1))
        self.nll.append(-logprobs.gather(-1, targets[:, None].cpu()).squeeze(-1))

    def summary(self) -> dict[str, float]:
        kl = torch.cat(self.kl).double()
        n = kl.numel()
        return {
            "KL mean": kl.mean().item(),
            "KL se": (kl.std().item() / math.sqrt(n)) if n > 1 else float("nan"),
            "KL p99": torch.quantile(kl, 0.99).item(),
            "top-1 agreement %": 100 * torch.cat(self.agree).double().mean().item(),
            "perplexity": math.exp(torch.cat(self.nll).double().mean().item()),
        }


def _result(
    variants: Mapping[str, nn.Module],
    reference: str,
    stats: dict[str, _TokenStats],
    answers: dict[str, list[str]],
    encoded: list[EncodedChat],
) -> ComparisonResult:
    import pandas as pd

    rows = [{"variant": name, "GiB": loaded_bytes(model) / GIB, **stats[name].summary()} for name, model in variants.items()]
    summary = pd.DataFrame(rows)
    baseline = summary.set_index("variant")["KL mean"].get("4bit")
    has_gap = baseline is not None and baseline > 0
    summary["gap closed %"] = 100 * (1 - summary["KL mean"] / baseline) if has_gap else float("nan")
    table = pd.DataFrame({"question": [c.question for c in encoded], "expected": [c.answer for c in encoded], **answers})
    table.index.name = "sample"
    descriptions = {name: _describe(model) for name, model in variants.items()}
    return ComparisonResult(summary=summary[SUMMARY_COLUMNS], answers=table, reference=reference, descriptions=descriptions)


def _describe(model: nn.Module) -> str:
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    quantized = [module for module in linears if is_quantized(module)]
    if not quantized:
        return f"16-bit ({str(model.dtype).removeprefix('torch.')})"
    kind = getattr(quantized[0].weight, "quant_type", "int8").upper()
    plan = getattr(model, "dq_plan", None)
    source = f", plan: {plan.source}" if plan is not None else ""
    return f"{kind}, {len(linears) - len(quantized)} of {len(linears)} Linear modules 16-bit{source}"


def _records(frame: Any) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()} for row in frame.to_dict("records")]


def _fmt(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"
