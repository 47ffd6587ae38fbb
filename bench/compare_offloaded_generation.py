"""Offloaded against GPU-resident KV caches: where greedy generation parts, and by how much the logits differ.

    python -m bench.compare_offloaded_generation --output_dir bench/results/offload_agreement

Random weights at TinyLlama shape, one prompt, greedy decoding through ``generate(cache_implementation=...)`` with each
cache of a pair (``dynamic`` / ``offloaded``, ``static`` / ``offloaded_static``). For each model, dtype and pair it
records the first position where the tokens part, the largest logit difference over the steps up to there (both runs
saw the same tokens), and the resident run's gap between its two best logits at the parting step: a gap within the
logits' rounding is a tie broken otherwise (numerics); a large one, or large logit differences before it, is a wrong
computation. Each case runs in a process of its own, so one that crashes (recorded with its exit status) does not take
the others with it. ``--eager`` turns off generate's compilation of the forward (``disable_compile``). The models are
what ``AutoModelForCausalLM`` builds: an LCKV model decodes over an offloaded cache without compiling whatever the flag
(``FastDecodeMixin``), a Llama runs transformers' own ``generate``.

SDPA's cuDNN backend is off unless ``--cudnn_attention``: torch 2.11+cu130 picks it for bf16 attention on an H200, and
its one-token kernel (a split reduction, ``lean_reduction_kernel``) is not run-to-run deterministic: there the same
resident generation parted from itself at step 26 in 2 of 3 runs, while with the backend off every resident, offloaded
and serialized run was bitwise equal (docs/performance.md, "KV cache offloading"). Off, the pairs compare where the KVs
live; on, ``--repeats`` shows the backend's own spread.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from models.export import write_json
from tools import cli as shared  # its import of models registers opt-llama
from tools.cli import ArgumentParser, check_output_dir, check_range, run_cli

PAIRS = {"dynamic": "offloaded", "static": "offloaded_static"}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["configs/tinyllama_opt.json", "configs/tinyllama.json"],
        help="model configs to compare",
    )
    parser.add_argument("--prompt_len", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--gen_len", type=int, default=256, help="new tokens")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], help=f"one or more of {sorted(DTYPES)}")
    parser.add_argument(
        "--resident", nargs="+", default=list(PAIRS), help=f"resident caches, each against its offloaded one: {PAIRS}"
    )
    parser.add_argument("--eager", action="store_true", help="generate without compiling the forward")
    parser.add_argument(
        "--cudnn_attention",
        action="store_true",
        help="let SDPA use its cuDNN backend (not run-to-run deterministic in bf16 on an H200; off by default)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="greedy runs of each cache without logits, each compared to the first"
    )
    parser.add_argument("--device", default="cuda", help="torch device (offloading needs cuda; cpu only smoke-tests)")
    parser.add_argument("--timeout_s", type=int, default=300, help="limit of each case's process, in seconds")
    parser.add_argument("--output_dir", default="bench/results/offload_agreement", help="where agreement.json goes")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    args = parser.parse_args(argv)
    for flag in ("prompt_len", "gen_len", "timeout_s", "repeats"):
        check_range(f"--{flag}", getattr(args, flag), minimum=1)
    shared.check_choices("--dtypes", args.dtypes, DTYPES)
    shared.check_choices("--resident", args.resident, PAIRS)
    args.device = shared.resolve_device(args.device)
    check_output_dir("--output_dir", args.output_dir)
    for path in args.configs:
        shared.load_config("--configs", path)
    return args


def agreement(resident: torch.Tensor, other: torch.Tensor, resident_logits, other_logits) -> dict:
    """Where two greedy runs of one prompt part: ``resident``/``other`` ``(1, prompt + new)`` tokens, the logits
    ``new x (1, vocab)`` of each step. Logits are compared up to and including the parting step (same inputs)."""
    new = len(resident_logits)
    differing = (resident[0, -new:] != other[0, -new:]).nonzero()
    parting = int(differing[0]) if len(differing) else None
    compared = new if parting is None else parting + 1
    gap = max((resident_logits[t] - other_logits[t]).abs().max().item() for t in range(compared))
    scale = max(resident_logits[t].abs().max().item() for t in range(compared))
    result = {"parting_step": parting, "max_logit_difference": gap, "max_abs_logit": scale}
    if parting is not None:
        best_two = resident_logits[parting][0].float().topk(2).values
        result["resident_top2_gap_at_parting"] = (best_two[0] - best_two[1]).item()
    return result


def run_case(args: argparse.Namespace, config_path: str, dtype: str, resident: str) -> dict:
    """Both runs of one case in this process: resident cache, then its offloaded twin."""
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.enable_cudnn_sdp(args.cudnn_attention)
    config = shared.load_config("--configs", config_path)
    config.max_position_embeddings = max(config.max_position_embeddings, args.prompt_len + args.gen_len)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], attn_implementation="sdpa").eval()
    ids = torch.randint(3, config.vocab_size, (1, args.prompt_len), device=args.device)
    kwargs = dict(
        max_new_tokens=args.gen_len,
        min_new_tokens=args.gen_len,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        disable_compile=args.eager,
    )
    with torch.no_grad():
        first = model.generate(ids, cache_implementation=resident, output_logits=True, **kwargs)
        second = model.generate(ids, cache_implementation=PAIRS[resident], output_logits=True, **kwargs)
        # Without logits asked for, as users run it: a resident static cache then decodes in the captured loop.
        # Each cache --repeats times: a resident run parting from the first resident one is the GPU's own
        # nondeterminism, not offloading.
        plain = {c: [model.generate(ids, cache_implementation=c, **kwargs).sequences for _ in range(args.repeats)]
                 for c in (resident, PAIRS[resident])}  # fmt: skip
    reference = plain[resident][0]

    def parting(sequence: torch.Tensor) -> int | None:
        differing = (sequence[0, args.prompt_len :] != reference[0, args.prompt_len :]).nonzero()
        return int(differing[0]) if len(differing) else None

    return {
        **agreement(first.sequences, second.sequences, first.logits, second.logits),
        "parting_step_without_logits": parting(plain[PAIRS[resident]][0]),
        "parting_steps_of_repeats": {c: [parting(s) for s in runs] for c, runs in plain.items()},
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args, *json.loads(args.case))))
        return {}
    results, path = [], Path(args.output_dir) / "agreement.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for config_path in args.configs:
        for dtype in args.dtypes:
            for resident in args.resident:
                case = [config_path, dtype, resident]
                command = [sys.executable, "-m", "bench.compare_offloaded_generation", *argv_of(args, config_path)]
                command.append("--case")
                try:
                    done = subprocess.run(
                        [*command, json.dumps(case)], capture_output=True, text=True, timeout=args.timeout_s
                    )
                    lines = done.stdout.strip().splitlines()
                    outcome = (
                        json.loads(lines[-1])
                        if done.returncode == 0 and lines
                        else {"exit_status": done.returncode, "stderr_tail": done.stderr[-2000:]}
                    )
                except subprocess.TimeoutExpired:
                    outcome = {"exit_status": "timeout"}
                results.append({"config": config_path, "dtype": dtype, "resident": resident, **outcome})
                print(json.dumps(results[-1])[:400], flush=True)
                write_json(
                    path,
                    {
                        "prompt_len": args.prompt_len,
                        "gen_len": args.gen_len,
                        "eager": args.eager,
                        "cudnn_attention": args.cudnn_attention,
                        "cases": results,
                    },
                )
    return {"cases": results}


def argv_of(args: argparse.Namespace, config_path: str) -> list[str]:
    """The options a case's process (of ``config_path``) needs to rebuild ``args``."""
    return [
        "--configs", config_path, "--prompt_len", str(args.prompt_len), "--gen_len", str(args.gen_len),
        "--device", args.device, "--output_dir", args.output_dir, "--repeats", str(args.repeats),
        *(["--eager"] if args.eager else []),
        *(["--cudnn_attention"] if args.cudnn_attention else []),
    ]  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
