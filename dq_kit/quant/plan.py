"""``Plan``: which modules stay 16-bit, by exact full name, plus the 4-bit settings for the rest.

transformers 5 matches ``llm_int8_skip_modules`` from the start of a module's full name or as a
suffix, no longer as a substring, so dq_kit always writes exact names and verifies them after loading.

Example:
    >>> import dq_kit as dq
    >>> model = dq.tiny.build_tiny_model("qwen2_vl")
    >>> plan = dq.Plan.from_patterns(model, ["merger"])     # a transformers-4 style substring
    >>> plan.keep
    ('model.visual.merger.mlp.0', 'model.visual.merger.mlp.2')
"""

from __future__ import annotations

import difflib
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PlanError
from ..files import Output, read_json, save_json
from ..models import registry
from ..models.resolution import checkpoint_renamer, default_dtype, live_module_name, meta_model, resolve_config

PLAN_FORMAT = "dq_kit.plan"
PLAN_VERSION = 2  # 2: per-module correction ranks (version-1 plans have none and still load)
PLAN_OUTPUT = Output("dq_kit plan", file_format=PLAN_FORMAT)
_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


@dataclass(frozen=True)
class Plan:
    """The modules kept in 16-bit, as exact full names, and the 4-bit settings for everything else.

    Attributes:
        keep: modules chosen to stay 16-bit (``model.visual.blocks.0.attn.qkv``, ...).
        fixed: modules never quantized whatever the choice (the output head, as bitsandbytes does).
        model_type: ``config.model_type`` of the model the plan was made for.
        family: dq_kit family name (``qwen2_vl``, ``mllama``, ...).
        quant_type: ``"nf4"`` or ``"fp4"``.
        double_quant: quantize the 4-bit scales too (saves ~0.37 bits/param).
        source: how the plan was made (``"uniform"``, ``"preset"``, ``"patterns"``, ``"manual"``, ...).
        reasons: per kept or corrected module, why (metric values, rank, rule, choice).
        corrections: modules that stay NF4 but get a frozen low-rank correction, with its rank
            (``{"model.layers.3.mlp.down_proj": 16}``); the factors come from the report that
            :func:`dq_kit.plan` chose them from (``dq.load(..., plan=plan, report=report)``).
        identity: the model the plan was made for: ``name_or_path``, ``num_layers``, ``hidden_size``
            (applying the plan to a model of another size warns).

    Example:
        >>> plan = Plan(keep=("model.layers.0.mlp.down_proj",), fixed=("lm_head",), model_type="llama")
        >>> plan.skip_modules
        ['lm_head', 'model.layers.0.mlp.down_proj']
    """

    keep: tuple[str, ...] = ()
    fixed: tuple[str, ...] = ()
    model_type: str | None = None
    family: str | None = None
    quant_type: str = "nf4"
    double_quant: bool = True
    source: str = "manual"
    reasons: dict[str, dict[str, Any]] = field(default_factory=dict)
    corrections: dict[str, int] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", tuple(sorted(set(self.keep))))
        object.__setattr__(self, "fixed", tuple(sorted(set(self.fixed))))
        if not isinstance(self.corrections, dict):
            raise PlanError(f"corrections must map module names to ranks, got {type(self.corrections).__name__}.")
        bad_ranks = {n: r for n, r in self.corrections.items() if isinstance(r, bool) or not isinstance(r, int) or r < 1}
        if bad_ranks:
            raise PlanError(f"Correction ranks must be positive integers, got {dict(list(bad_ranks.items())[:3])!r}.")
        if both := sorted(set(self.corrections) & (set(self.keep) | set(self.fixed))):
            raise PlanError(f"Module(s) both kept in 16-bit and corrected: {both[:5]}. A module is NF4, NF4 + correction or 16-bit.")
        object.__setattr__(self, "corrections", dict(sorted(self.corrections.items())))
        if self.quant_type not in ("nf4", "fp4"):
            raise PlanError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}.")
        bad = [name for name in (*self.keep, *self.fixed) if not isinstance(name, str) or not name]
        if bad:
            raise PlanError(f"Module names must be non-empty strings, got {bad[:5]!r}.")
        if not isinstance(self.double_quant, bool):
            raise PlanError(f"double_quant must be true or false, got {self.double_quant!r}.")
        if not isinstance(self.identity, dict):
            raise PlanError(f"identity must be a dict (name_or_path, num_layers, hidden_size), got {type(self.identity).__name__}.")

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def uniform(cls, model: nn.Module | Any) -> Plan:
        """Plain 4-bit: every Linear quantized except the output head (bitsandbytes' default).

        Example:
            >>> import dq_kit as dq
            >>> Plan.uniform(dq.tiny.build_tiny_model("llama")).skip_modules
            ['lm_head']
        """
        model = _as_model(model)
        return cls(fixed=tuple(registry.always_16bit(model)), source="uniform", **_identity(model))

    @classmethod
    def preset(cls, model: nn.Module | Any) -> Plan:
        """The family's published rule (see ``dq_kit.models.registry.FAMILIES[...].preset_doc``).

        Example:
            >>> import dq_kit as dq
            >>> Plan.preset(dq.tiny.build_tiny_model("mllama")).keep
            ('model.language_model.layers.3.cross_attn.o_proj',)
        """
        model = _as_model(model)
        family = registry.family_of(model.config)
        keep = registry.preset_modules(model, family)
        reasons = {name: {"rule": f"preset:{family.name}"} for name in keep}
        return replace(cls.uniform(model), keep=tuple(keep), source="preset", reasons=reasons)

    @classmethod
    def from_patterns(cls, model: nn.Module | Any, patterns: Iterable[str]) -> Plan:
        """Expand regexes, prefixes, suffixes and legacy substrings into exact module names.

        A pattern selects a Linear module when it matches the way transformers 5 does (a regex
        from the start of the full name up to a module boundary, or a suffix) or the way
        transformers 4 did (a plain substring), so skip lists copied from published checkpoints
        keep their meaning. A name as the checkpoint writes it (``language_model.model.layers.3``)
        is translated to the live model's name through transformers' key mapping. Patterns that
        only match as substrings trigger a warning; a pattern that matches nothing is an error.

        Example:
            >>> import dq_kit as dq
            >>> model = dq.tiny.build_tiny_model("llama")
            >>> Plan.from_patterns(model, [r"model\\.layers\\.1\\..*down_proj"]).keep
            ('model.layers.1.mlp.down_proj',)
        """
        model = _as_model(model)
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        names = [info.name for info in registry.linear_modules(model)]
        heads = set(registry.always_16bit(model))
        selected: set[str] = set()
        unmatched, legacy_only = [], []
        for pattern, live in zip(patterns, live_patterns(model, names, patterns), strict=True):
            modern = {name for name in names if matches_skip_pattern(live, name)}
            legacy = {name for name in names if live in name}
            if not modern | legacy:
                unmatched.append(pattern)
            elif legacy - modern:
                legacy_only.append(pattern)
            selected |= modern | legacy
        if unmatched:
            raise PlanError(
                f"{len(unmatched)} pattern(s) match no Linear module of this {model.config.model_type} model: "
                + "; ".join(f"{p!r}{_suggest(p, names)}" for p in unmatched)
            )
        if legacy_only:
            warnings.warn(
                f"Pattern(s) {legacy_only!r} select modules only as substrings (transformers 4 behaviour); "
                "transformers 5 would silently quantize those modules. dq_kit expanded them to exact names.",
                stacklevel=2,
            )
        reasons = {name: {"rule": "pattern"} for name in selected - heads}
        return cls(keep=tuple(selected - heads), fixed=tuple(heads), source="patterns", reasons=reasons, **_identity(model))

    def with_modules(self, keep: Iterable[str] = (), quantize: Iterable[str] = (), reason: str = "manual") -> Plan:
        """A copy with modules added to ``keep`` and removed via ``quantize`` (exact names).

        Example:
            >>> Plan(keep=("a",)).with_modules(keep=["b"], quantize=["a"]).keep
            ('b',)
        """
        quantize = set(quantize)
        added = set(keep) - set(self.keep)
        reasons = {n: r for n, r in self.reasons.items() if n not in quantize} | {n: {"rule": reason} for n in added}
        corrections = {n: r for n, r in self.corrections.items() if n not in added and n not in quantize}
        return replace(self, keep=tuple((set(self.keep) | set(keep)) - quantize), reasons=reasons, corrections=corrections)

    def without_corrections(self) -> Plan:
        """A copy with no correction (those modules plain NF4), e.g. once the corrections are merged or trained.

        Example:
            >>> Plan(keep=("a",), corrections={"b": 8}).without_corrections().corrections
            {}
        """
        return replace(self, corrections={}, reasons={n: r for n, r in self.reasons.items() if n not in self.corrections})

    def with_corrections(self, ranks: dict[str, int], reason: str = "manual") -> Plan:
        """A copy where each module of ``ranks`` gets an NF4 + rank-r correction (rank 0 removes it; a kept module goes back to NF4).

        Example:
            >>> Plan(keep=("a",)).with_corrections({"a": 8, "b": 4}).corrections
            {'a': 8, 'b': 4}
        """
        corrections = {**self.corrections, **{n: r for n, r in ranks.items() if r}}
        for name, rank in ranks.items():
            if not rank:
                corrections.pop(name, None)
        reasons = {n: r for n, r in self.reasons.items() if n not in ranks} | {
            n: {"rule": reason, "choice": f"nf4+r{r}"} for n, r in ranks.items() if r
        }
        return replace(self, keep=tuple(set(self.keep) - set(ranks)), reasons=reasons, corrections=corrections)

    # ---- use ---------------------------------------------------------------------------------

    @property
    def skip_modules(self) -> list[str]:
        """Exact names passed to ``llm_int8_skip_modules``: kept plus fixed modules."""
        return sorted(set(self.keep) | set(self.fixed))

    def bnb_config(self, compute_dtype: torch.dtype | str | None = None, quant_storage: torch.dtype = torch.uint8):
        """The ``transformers.BitsAndBytesConfig`` that loads a model according to this plan.

        ``quant_storage`` is the dtype the packed 4-bit weights are stored as (``torch.bfloat16``
        lets FSDP shard 4-bit and 16-bit parameters together).

        Example:
            >>> cfg = Plan(fixed=("lm_head",)).bnb_config(torch.float32)
            >>> cfg.bnb_4bit_quant_type, cfg.llm_int8_skip_modules
            ('nf4', ['lm_head'])
        """
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=compute_dtype or default_dtype(),
            bnb_4bit_quant_storage=quant_storage,
            llm_int8_skip_modules=self.skip_modules,
        )

    def check(self, model: nn.Module) -> None:
        """Raise :class:`PlanError` unless every planned module exists in ``model`` as a Linear layer
        and the plan was made for this architecture.

        Example:
            >>> import dq_kit as dq
            >>> model = dq.tiny.build_tiny_model("llama")
            >>> Plan.uniform(model).check(model)
        """
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if self.model_type and model_type and self.model_type != model_type:
            raise PlanError(
                f"This plan was made for a {self.model_type!r} model but the model is {model_type!r}. "
                "Make a plan for this model (dq.Plan.preset(model), dq.plan(report)) instead."
            )
        if config is not None and (why := registry.different_models(self.identity, registry.model_identity(config))):
            warnings.warn(f"This plan was made for another {model_type} model ({self.identity.get('name_or_path') or 'unnamed'}: "
                          f"{why}); its choices were measured on that model. Make a plan for this one with dq.plan(dq.analyze(model, ...)).",
                          stacklevel=3)
        names = [info.name for info in registry.linear_modules(model)]
        known = set(names)
        missing = [name for name in self.skip_modules if name not in known]
        if missing:
            shown = "; ".join(f"{name!r}{_suggest(name, names)}" for name in missing[:8])
            more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
            raise PlanError(f"The plan names {len(missing)} module(s) that are not Linear layers of this model: {shown}{more}.")
        shapes = {info.name: min(info.in_features, info.out_features) for info in registry.linear_modules(model)}
        if unknown := [name for name in self.corrections if name not in shapes]:
            raise PlanError(f"The plan corrects {len(unknown)} module(s) that are not Linear layers of this model: "
                            + "; ".join(f"{n!r}{_suggest(n, names)}" for n in unknown[:8]) + ".")
        if too_big := {n: r for n, r in self.corrections.items() if r > shapes[n]}:
            raise PlanError(f"Correction rank(s) above min(in, out) of the module: {dict(list(too_big.items())[:5])}.")

    # ---- persistence -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the on-disk format: version 2 with corrections, else version 1)."""
        data = {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION if self.corrections else 1,  # plans without corrections stay readable by older dq_kit
            "model_type": self.model_type,
            "family": self.family,
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "source": self.source,
            "keep": list(self.keep),
            "fixed": list(self.fixed),
            "reasons": self.reasons,
        }
        if self.corrections:
            data["corrections"] = self.corrections
        if self.identity:
            data["identity"] = self.identity
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Inverse of :meth:`to_dict`, with a clear error for anything that is not a dq_kit plan."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"Not a dq_kit plan: expected a JSON object with \"format\": \"{PLAN_FORMAT}\".")
        _check_field_types(data)
        if data.get("version", 1) > PLAN_VERSION:
            raise PlanError(f"Plan format version {data['version']} is newer than this dq_kit understands; upgrade dq_kit.")
        return cls(
            keep=tuple(data.get("keep") or ()),
            fixed=tuple(data.get("fixed") or ()),
            model_type=data.get("model_type"),
            family=data.get("family"),
            quant_type=data.get("quant_type", "nf4"),
            double_quant=data.get("double_quant", True),
            source=data.get("source", "manual"),
            reasons=dict(data.get("reasons") or {}),
            corrections=dict(data.get("corrections") or {}),
            identity=dict(data.get("identity") or {}),
        )

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the plan as JSON (atomically); an existing file is replaced only when it is a dq_kit
        plan, or with ``overwrite=True``.

        Example:
            >>> import tempfile, os
            >>> path = Plan(keep=("lm_head",)).save(os.path.join(tempfile.mkdtemp(), "plan.json"))
            >>> Plan.load(path).keep
            ('lm_head',)
        """
        return save_json(path, self.to_dict(), PLAN_OUTPUT, overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a plan saved by :meth:`save`; a missing or corrupt file raises :class:`PlanError`."""
        return cls.from_dict(read_json(path, "Plan", PlanError))

    def __str__(self) -> str:
        head = f"Plan({self.source}, {self.family or self.model_type or 'any model'}, {self.quant_type}"
        head += "+double-quant" if self.double_quant else ""
        corrected = f", {len(self.corrections)} with NF4 + low-rank correction" if self.corrections else ""
        lines = [head + f"): {len(self.keep)} module(s) kept in 16-bit{corrected}, fixed: {list(self.fixed)}"]
        lines += [f"  {name}" for name in self.keep[:20]]
        if len(self.keep) > 20:
            lines.append(f"  ... and {len(self.keep) - 20} more")
        lines += [f"  {name}  +r{rank}" for name, rank in list(self.corrections.items())[:10]]
        if len(self.corrections) > 10:
            lines.append(f"  ... and {len(self.corrections) - 10} more corrected")
        return "\n".join(lines)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "version": (int,), "keep": (list,), "fixed": (list,), "model_type": (str, type(None)), "family": (str, type(None)),
    "quant_type": (str,), "double_quant": (bool,), "source": (str,), "reasons": (dict, type(None)),
    "corrections": (dict, type(None)), "identity": (dict, type(None)),
}


def _check_field_types(data: dict[str, Any]) -> None:
    """Raise :class:`PlanError` naming every field of a plan file with the wrong JSON type."""
    wrong = [
        f"{key!r} is {type(data[key]).__name__} {data[key]!r:.40}, expected {' or '.join(t.__name__ for t in types if t is not type(None))}"
        for key, types in _FIELD_TYPES.items()
        if key in data and (not isinstance(data[key], types) or (isinstance(data[key], bool) and bool not in types))
    ]
    for key in ("keep", "fixed"):
        if isinstance(data.get(key), list) and (bad := [v for v in data[key] if not isinstance(v, str)]):
            wrong.append(f"{key!r} holds {bad[0]!r}, expected module names (strings)")
    if wrong:
        raise PlanError("Malformed plan file: " + "; ".join(wrong) + ". Fix it by hand or make it again with dq.plan / Plan.save.")


def selects_any(pattern: str, names: list[str]) -> bool:
    """Whether ``pattern`` selects one of ``names`` as transformers 5 matches (or, as a substring, transformers 4).

    Example:
        >>> selects_any("down_proj", ["model.layers.0.mlp.down_proj"]), selects_any("visual", ["model.layers.0.mlp.up_proj"])
        (True, False)
    """
    return any(pattern in name or matches_skip_pattern(pattern, name) for name in names)


def live_patterns(model: nn.Module, names: list[str], patterns: list[str]) -> list[str]:
    """Each pattern as written when it selects one of ``names`` (modern or substring match), else its
    translation from checkpoint naming (``language_model.model.layers.3``) through transformers' key mapping.

    Example:
        >>> import dq_kit as dq
        >>> model = dq.tiny.build_tiny_model("llava")
        >>> live_patterns(model, ["model.language_model.layers.1.mlp.down_proj"], ["language_model.model.layers.1.mlp", "down_proj"])
        ['model.language_model.layers.1.mlp', 'down_proj']
    """
    rename = None
    translated = []
    for pattern in patterns:
        if not selects_any(pattern, names):
            rename = rename or checkpoint_renamer(model)
            pattern = live_module_name(rename, pattern)
        translated.append(pattern)
    return translated


def matches_skip_pattern(pattern: str, name: str) -> bool:
    """transformers 5 ``should_convert_module`` semantics: regex from the start to a boundary, or suffix."""
    try:
        matched = re.match(rf"(?:{pattern}){_BOUNDARY}", name) is not None
    except re.error:
        matched = False
    return matched or name.endswith(pattern)


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _identity(model: nn.Module) -> dict[str, Any]:
    family = registry.family_of(model.config)
    return {"model_type": model.config.model_type, "family": family.name, "identity": registry.model_identity(model.config)}


def _as_model(model: nn.Module | Any) -> nn.Module:
    """Accept a model, or anything :func:`dq_kit.models.resolution.resolve_config` takes (built on the meta device)."""
    if isinstance(model, nn.Module):
        return model
    return meta_model(resolve_config(model, prefer_shipped=True))
