"""Multi-process training on CPU (gloo): DDP through run_clm.py, FSDP2 on the model itself.

* DDP: ``torchrun --nproc_per_node 2 run_clm.py --use_cpu`` with batch 4 per process logs the same per-step losses
  as one process with batch 8 (the Trainer shards each global batch of the same seeded order over the ranks; the
  tiny config has no dropout). ``--ddp_find_unused_parameters false`` makes an unused parameter an error.
* FSDP2: accelerate 1.15 only enables FSDP for GPU-class backends (MULTI_CPU ignores it), so the CPU test applies
  ``fully_shard`` per decoder layer + root itself, as accelerate's FSDP2 path does. A parameter used outside its
  wrapped module would be a sharded DTensor there and fail; the losses must match one process and the gathered full
  state dict, saved as safetensors, must load with ``from_pretrained`` on one device and generate.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from corpus import prepare_corpus
from tests.conftest import REPO, tiny_config, tiny_model

WORLD = 2
STEPS = 4
GLOBAL_BATCH = 8


def train_args(data: Path, tokenizer: Path, out: Path, batch: int, extra: list[str]) -> list[str]:
    """run_clm.py arguments for a few logged steps of the tiny opt-llama model on CPU."""
    return [
        "--config_name", str(REPO / "configs" / "test_tiny_opt.json"),
        "--train_file", str(data / "train.txt"), "--validation_file", str(data / "validation.txt"),
        "--tokenizer_name", str(tokenizer), "--block_size", "32", "--output_dir", str(out),
        "--do_train", "--max_steps", str(STEPS), "--logging_steps", "1", "--save_strategy", "no",
        "--per_device_train_batch_size", str(batch), "--learning_rate", "3e-3", "--seed", "0",
        "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
        "--ddp_find_unused_parameters", "false", *extra,
    ]  # fmt: skip


def logged_losses(out: Path) -> list[tuple[int, float, float]]:
    """(step, epoch, loss) of every training log entry in ``out/trainer_state.json``."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [(h["step"], h["epoch"], h["loss"]) for h in history if "loss" in h]


def run(cmd: list[str]) -> None:
    """Run ``cmd`` from the repo root on one thread per process; fail the test with its output tail on error."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"{cmd[1:4]} exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """A few KB of the embedded corpus as local txt files, and the corpus tokenizer."""
    corpus = prepare_corpus()
    d = tmp_path_factory.mktemp("data")
    (d / "train.txt").write_text(corpus.train.read_text()[:20000])
    (d / "validation.txt").write_text(corpus.validation.read_text()[:4000])
    return d, corpus.tokenizer


@pytest.mark.parametrize(
    "extra",
    [[], ["--gradient_checkpointing", "--config_overrides", "train_kv=true"]],
    ids=["plain", "ckpt-kvloss"],
)
def test_ddp_two_processes_match_one_process(extra, data, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "run_clm.py"]
    run(torchrun + train_args(*data, tmp_path / "ddp", GLOBAL_BATCH // WORLD, extra))
    run([sys.executable, "run_clm.py"] + train_args(*data, tmp_path / "single", GLOBAL_BATCH, extra))
    ddp, single = logged_losses(tmp_path / "ddp"), logged_losses(tmp_path / "single")
    assert [step for step, _, _ in ddp] == list(range(1, STEPS + 1))
    # Same epoch fraction per step = same global batch, i.e. both ranks took part.
    assert [epoch for _, epoch, _ in ddp] == pytest.approx([epoch for _, epoch, _ in single])
    assert [loss for _, _, loss in ddp] == pytest.approx([loss for _, _, loss in single], rel=1e-4)
    assert ddp[-1][2] < ddp[0][2]  # it trained


# ----------------------------------------------------------------------------- FSDP2


def batch_tokens() -> torch.Tensor:
    """The fixed global batch ``(GLOBAL_BATCH, 32)`` every FSDP step trains on."""
    return torch.randint(0, 256, (GLOBAL_BATCH, 32), generator=torch.Generator().manual_seed(1))


def train_steps(model: torch.nn.Module, tokens: torch.Tensor, reduce=None) -> list[float]:
    """A few AdamW steps on ``tokens``; the per-step mean loss (over ranks with ``reduce``)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(reduce(loss.detach()) if reduce else loss.item())
    return losses


def fsdp_worker(rank: int, rendezvous: str, out: str) -> None:
    """One rank: shard the tiny model FSDP2-style, train on this rank's half of the batch, save the full weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    model = tiny_model(tiny_config(), seed=0)  # same seed: identical full weights on every rank before sharding
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)

    def mean_over_ranks(loss: torch.Tensor) -> float:
        dist.all_reduce(loss)
        return loss.item() / WORLD

    losses = train_steps(model, batch_tokens().chunk(WORLD)[rank], mean_over_ranks)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(out, state_dict=state)
        Path(out, "losses.json").write_text(json.dumps(losses))
    # Tear gloo down together: a rank destroying its group while the other still saves aborts (SIGABRT) in CI.
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp2_matches_one_process_and_checkpoint_loads_on_one_device(tmp_path):
    out = tmp_path / "fsdp"
    mp.spawn(fsdp_worker, args=(str(tmp_path / "rendezvous"), str(out)), nprocs=WORLD)

    reference = tiny_model(tiny_config(), seed=0)
    expected = train_steps(reference, batch_tokens())
    assert json.loads((out / "losses.json").read_text()) == pytest.approx(expected, rel=1e-4)
    assert (out / "model.safetensors").exists()

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    reference.eval()
    prompt = batch_tokens()[:2, :8]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=prompt).logits, reference(input_ids=prompt).logits)
    generated = loaded.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, reference.generate(prompt, max_new_tokens=4, do_sample=False))
