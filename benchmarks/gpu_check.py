"""One-command GPU check of dq_kit: load, verify, analyse, train and generate on one CUDA GPU.

Models (no downloads): the tiny Qwen2-VL and llama of ``dq.tiny``, the shipped demo VLM, and two
random-weight models of about 1B parameters built from shipped configs: Qwen2-VL-2B with half its
language layers, and the language model of Llama 3.2 11B Vision with two layers. For each model:

* load + verify in 16-bit, NF4 and dynamic (preset plan; with corrections where the analysis made them);
* ``dq.analyze`` whole-model and sequential: time, and peak CUDA memory added against
  ``dq.estimate_memory(task="analyze")``;
* LoRA training (``dq.sft_trainer``) on 16-bit, NF4 and dynamic: samples/s and peak memory, with
  the dynamic/NF4 ratios (targets: at least 0.95x the speed, at most 1.1x the memory);
* generation tokens/s;
* the fp16 path a T4 takes (load, train, generate in float16);
* ``dq-kit train`` on the tiny VLM under ``torchrun`` over every GPU: DDP, then FSDP with the 4-bit
  weights stored as bf16 (that the processes agree, the parallelism the trainer used, the adapter).

Writes ``benchmarks/results/gpu.md`` and ``gpu.json`` (progressively: a run cut short keeps what it
measured). Without CUDA, or with a bitsandbytes that has no CUDA kernels, it says so and exits 0.

Run: ``make gpu-check`` or ``python benchmarks/gpu_check.py [--quick]`` (``--quick``: tiny models only).
``--rehearse`` runs the same steps on the CPU with the tiny models (memory from the process's RSS),
writing ``gpu_rehearsal.md`` instead: it checks the script itself before a GPU's time is spent on it.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
RESULT_NAME = "gpu"
TRAIN_STEPS = 12
BATCH = 4
NEW_TOKENS = 64


def _cuda_ready() -> str | None:
    """Why this machine cannot run the check, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
    try:
        import bitsandbytes.functional as bnbf

        weight = torch.randn(64, 64, device="cuda", dtype=torch.float16)
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4")
        bnbf.dequantize_4bit(packed, state)
    except Exception as exc:  # noqa: BLE001 - any failure means no usable kernels
        return f"bitsandbytes has no working CUDA 4-bit kernels here ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


class Recorder:
    """Collects result rows and rewrites the result files after each one."""

    def __init__(self, header: dict[str, Any]) -> None:
        self.header, self.rows = header, []

    def add(self, section: str, **row: Any) -> None:
        self.rows.append({"section": section, **row})
        print(json.dumps(self.rows[-1], default=str), flush=True)
        self.write()

    def write(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{RESULT_NAME}.json").write_text(json.dumps({**self.header, "rows": self.rows}, indent=2, default=str) + "\n")
        lines = ["# GPU check", "", *[f"- {key}: {value}" for key, value in self.header.items()], ""]
        sections: dict[str, list[dict]] = {}
        for row in self.rows:
            sections.setdefault(row["section"], []).append(row)
        for section, rows in sections.items():
            columns = [key for key in rows[0] if key != "section"]
            for row in rows[1:]:
                columns += [key for key in row if key not in columns and key != "section"]
            lines += [f"## {section}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(row.get(key, "")) for key in columns) + " |" for row in rows]
            lines.append("")
        (RESULTS / f"{RESULT_NAME}.md").write_text("\n".join(lines))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("|", "/").replace("\n", " ")[:200]


DEVICE = "cuda"


def measured(function, *args, **kwargs) -> tuple[Any, float, int]:
    """``(result, seconds, peak bytes added)`` of one call: CUDA memory, or RSS when rehearsing on the CPU."""
    import dq_kit as dq

    stats = dq.device_stats()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - stats.started, stats.peak() - stats.before


def in_use() -> int:
    from dq_kit.training.device_stats import memory_in_use

    return memory_in_use()


def build_models(folder: Path, quick: bool) -> dict[str, Path]:
    """The models of the check, saved as folders (random weights, bf16)."""
    import torch
    import transformers

    import dq_kit as dq
    from dq_kit.demo import demo_model_path

    models = {"tiny qwen2_vl": dq.tiny.save_tiny("qwen2_vl", folder / "tiny-qwen2-vl"),
              "tiny llama": dq.tiny.save_tiny("llama", folder / "tiny-llama")}
    if quick:
        return models
    models["demo VLM"] = demo_model_path()
    qwen = dq.modeling.resolve_config("Qwen/Qwen2-VL-2B-Instruct", prefer_shipped=True)
    qwen.text_config.num_hidden_layers = qwen.text_config.num_hidden_layers // 2
    mllama = dq.modeling.resolve_config("meta-llama/Llama-3.2-11B-Vision-Instruct", prefer_shipped=True).text_config.to_dict()
    llama = transformers.LlamaConfig(**{k: v for k, v in mllama.items() if k in transformers.LlamaConfig().to_dict() and k != "model_type"})
    llama.num_hidden_layers, llama.tie_word_embeddings = 2, False
    for name, config, model_class in (("qwen2_vl ~1B", qwen, transformers.Qwen2VLForConditionalGeneration),
                                      ("llama ~1B", llama, transformers.LlamaForCausalLM)):
        with torch.device(DEVICE):
            model = model_class(config).to(torch.bfloat16).eval()
        path = folder / name.replace(" ", "-").replace("~", "")
        model.save_pretrained(path)
        processor = dq.tiny.tiny_processor("qwen2_vl" if "qwen" in name else "llama")
        processor.save_pretrained(path)
        del model
        _empty_cache()
        models[name] = path
    return models


def _is_vlm(path: Path) -> bool:
    import dq_kit as dq

    return getattr(dq.modeling.resolve_config(path), "vision_config", None) is not None


def _train_rows(vlm: bool, n: int = 32):
    from datasets import Dataset

    import dq_kit as dq

    if vlm:
        return dq.data.shapes_dataset(n, task="colour", test_size=None)
    text = "a red circle on the left and a blue square on the right " * 4
    return Dataset.from_list([{"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe the picture."}]},
                                            {"role": "assistant", "content": [{"type": "text", "text": text}]}]}] * n)


def check_model(name: str, path: Path, record: Recorder, dtype=None, section_suffix: str = "") -> None:
    import torch

    import dq_kit as dq

    vlm = _is_vlm(path)
    calibration = dq.default_calibration(n=8, images=vlm)
    report = None
    for mode, sequential in (("whole", False), ("sequential", True)):
        try:
            _empty_cache()
            if sequential:
                result, seconds, peak = measured(dq.analyze, path, calibration=calibration, sequential=True, progress=False)
                resident = 0
            else:
                model16, processor = dq.load(path, quant="16bit", dtype=dtype)
                result, seconds, peak = measured(dq.analyze, model16, processor, calibration, sequential=False, corrections=True,
                                                 progress=False)
                resident = in_use()
                report = result
                del model16
            tokens = int(result.meta.get("calibration_tokens", 0) / max(result.meta.get("calibration_samples", 1), 1))
            predicted = dq.estimate_memory(path, task="analyze", sequential=sequential, corrections=not sequential, tokens=max(tokens, 1),
                                           device=DEVICE, dtype=dtype).peak_bytes
            record.add("analysis" + section_suffix, model=name, mode=mode, seconds=seconds, peak_added_gib=peak / 2**30,
                       predicted_gib=predicted / 2**30, error=predicted / peak - 1 if peak else float("nan"),
                       kl_uniform=result.meta.get("kl_uniform"), resident_gib=resident / 2**30)
        except Exception as exc:  # noqa: BLE001 - record and go on
            record.add("analysis" + section_suffix, model=name, mode=mode, error=_failure(exc))
    plan = dq.plan(report, budget=0.10) if report is not None else None
    speeds: dict[str, dict[str, float]] = {}
    for quant in ("16bit", "4bit", "dynamic"):
        try:
            _empty_cache()
            kwargs = {"plan": plan, "report": report} if quant == "dynamic" and plan is not None else {}
            (model, processor), seconds, _ = measured(dq.load, path, quant=quant, dtype=dtype, **kwargs)
            footprint = in_use()
            peft_model = dq.add_lora(model, r=16, vision=False)
            fp16 = dtype == torch.float16
            trainer = dq.sft_trainer(peft_model, processor, _train_rows(vlm), output_dir=tempfile.mkdtemp(), max_steps=TRAIN_STEPS,
                                     per_device_train_batch_size=BATCH, save_strategy="no", logging_steps=TRAIN_STEPS,
                                     **({"bf16": False, "fp16": True} if fp16 else {}))
            output, train_seconds, train_peak = measured(trainer.train)
            samples_per_s = TRAIN_STEPS * BATCH / train_seconds
            image = dq.tiny.tiny_image(0) if vlm else None
            answer, generate_seconds, _ = measured(dq.generate, peft_model, processor, image, "Describe the picture.", max_new_tokens=NEW_TOKENS)
            new_tokens = len(dq.data.chat.tokenizer_of(processor)(answer, add_special_tokens=False)["input_ids"])
            speeds[quant] = {"samples_per_s": samples_per_s, "peak": train_peak}
            record.add("load, train, generate" + section_suffix, model=name, quant=quant, load_s=seconds, model_gib=footprint / 2**30,
                       train_samples_per_s=samples_per_s, train_peak_added_gib=train_peak / 2**30, final_loss=output.training_loss,
                       generate_tokens_per_s=new_tokens / generate_seconds, corrected=bool(getattr(model, "dq_plan", None) and model.dq_plan.corrections))
            del model, peft_model, trainer
        except Exception as exc:  # noqa: BLE001
            record.add("load, train, generate" + section_suffix, model=name, quant=quant, error=_failure(exc))
    if "4bit" in speeds and "dynamic" in speeds:
        record.add("dynamic vs NF4 training" + section_suffix, model=name,
                   speed_ratio=speeds["dynamic"]["samples_per_s"] / speeds["4bit"]["samples_per_s"],
                   memory_ratio=speeds["dynamic"]["peak"] / max(speeds["4bit"]["peak"], 1), targets="speed >= 0.95, memory <= 1.1")


def check_scripted_training(tiny_vlm: Path, record: Recorder, folder: Path) -> None:
    """`dq-kit train` under torchrun on every GPU (DDP), then with FSDP (4-bit weights stored as bf16), as a user runs it."""
    import torch

    processes = max(1, torch.cuda.device_count()) if DEVICE == "cuda" else 2
    variants = {"DDP": []}
    if DEVICE == "cuda":
        variants["FSDP"] = ["--sft", 'fsdp="full_shard auto_wrap"', "--sft", 'fsdp_config={"use_orig_params": false}']
    for name, extra in variants.items():
        output = folder / f"train-{name}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   "-m", "dq_kit.cli", "train", str(tiny_vlm), "--output", str(output), "--samples", "32", "--steps", "4",
                   "--batch-size", str(4 * processes), "--lora-r", "4", "--sft", "disable_tqdm=true", *extra]
        tick = time.perf_counter()
        finished = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        fingerprints = set(re.findall(r"adapter fingerprint ([0-9a-f]{64})", finished.stdout))
        mode = re.search(r"parallelism: (\S+)", finished.stdout)
        record.add("dq-kit train under torchrun", variant=name, processes=processes, ok=finished.returncode == 0,
                   seconds=round(time.perf_counter() - tick, 1), parallelism=mode.group(1) if mode else "",
                   ranks_agree=len(fingerprints) == 1 if name == "DDP" else "n/a (sharded)", adapter=(output / "adapter" / "adapter_model.safetensors").is_file(),
                   error="" if finished.returncode == 0 else (finished.stderr.strip().splitlines() or [""])[-1])


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} @ {traceback.extract_tb(exc.__traceback__)[-1].name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models only (a minute)")
    parser.add_argument("--rehearse", action="store_true", help="run the steps on the CPU with the tiny models, to check the script")
    args = parser.parse_args(argv)
    global DEVICE, RESULT_NAME
    if args.rehearse:
        DEVICE, RESULT_NAME, args.quick = "cpu", "gpu_rehearsal", True
    why_not = None if args.rehearse else _cuda_ready()
    if why_not:
        print(f"GPU check skipped: {why_not}. Nothing was measured; run it on a machine with a CUDA GPU.")
        return 0
    import bitsandbytes
    import torch
    import transformers

    import dq_kit as dq

    started = time.perf_counter()
    device = (torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB") if DEVICE == "cuda" else (
        "CPU rehearsal (not a GPU measurement)", "RSS")
    record = Recorder({"gpu": device[0], "memory": device[1],
                       "torch": torch.__version__, "cuda": torch.version.cuda if DEVICE == "cuda" else None, "transformers": transformers.__version__,
                       "bitsandbytes": bitsandbytes.__version__, "dq_kit": dq.__version__, "python": platform.python_version()})
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp), args.quick)
        for name, path in models.items():
            check_model(name, path, record)
        if DEVICE == "cuda":  # fp16 matmuls are a GPU path
            fp16_model = models.get("qwen2_vl ~1B", models["tiny qwen2_vl"])
            check_model(f"{next(n for n, p in models.items() if p == fp16_model)} (fp16)", fp16_model, record, dtype=torch.float16,
                        section_suffix=" (fp16, the T4 path)")
        check_scripted_training(models["tiny qwen2_vl"], record, Path(tmp))
    record.header["total_s"] = round(time.perf_counter() - started, 1)
    record.write()
    print(f"GPU check finished in {record.header['total_s']} s: {RESULTS / (RESULT_NAME + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
