"""Devices and precision on a CPU-only machine (CI has no GPU): resolution, placement of every
tensor of a client round (on the meta device), one-line errors for CUDA requests, a bf16 base
with fp32 adapters training on CPU. The same paths on a real GPU: tests/test_gpu.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from fedtune import device as D
from fedtune.config import ModelConfig, TrainConfig
from fedtune.errors import ConfigError, ModelError
from fedtune.modeling import build_model, trainable_state
from fedtune.training import Encoded, evaluate, make_optimizer, run_steps, train_local, BatchStream, warmup

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(model="tiny", lora_rank=4)


def fake_cuda(monkeypatch, count: int = 2, current: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


def test_resolution_without_cuda() -> None:
    assert D.resolve("auto") == D.resolve("cpu") == torch.device("cpu")
    for request in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=rf"bad value device='{request}': this process sees no CUDA device"):
            D.resolve(request)
    with pytest.raises(ConfigError, match="must be auto, cpu, cuda or cuda:N"):
        D.resolve("gpu")


def test_resolution_with_cuda_takes_the_device_this_process_was_given(monkeypatch) -> None:
    fake_cuda(monkeypatch, count=2, current=1)  # e.g. CUDA_VISIBLE_DEVICES=3,5 and torch.cuda.set_device(1)
    assert D.resolve("auto") == D.resolve("cuda") == torch.device("cuda", 1)
    assert D.resolve("cuda:0") == torch.device("cuda", 0) and D.resolve("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="server-device='cuda:2': this process sees 2 CUDA device"):
        D.resolve("cuda:2", "server-device")


def test_autocast_choice(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(D, "cpu_has_bf16", lambda: True)
    assert D.autocast_dtype(cpu, "float32", "off") is None  # the default: plain fp32, numbers unchanged
    assert D.autocast_dtype(cpu, "float32", "auto") is torch.bfloat16
    assert D.autocast_dtype(cuda, "float32", "auto") is None  # cpu-autocast is about CPUs only
    assert D.autocast_dtype(cuda, "bfloat16") is torch.bfloat16 and D.autocast_dtype(cpu, "float16") is torch.float16
    monkeypatch.setattr(D, "cpu_has_bf16", lambda: False)
    assert D.autocast_dtype(cpu, "float32", "auto") is None  # no AMX / AVX512-BF16: nothing changes


class MetaRound(TorchDispatchMode):
    """Runs a round on meta tensors: scalars read from them are 0, copies out of them are
    zeros (counted: the only legitimate ones are at the wire boundary), and any op that mixes
    meta and CPU tensors is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[str] = []
        self.to_cpu = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kinds = {a.device.type for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor) and a.dim() > 0}
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if first is not None and first.device.type == "meta":
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                        torch.ops.aten.item.default):
                return False if first.dtype == torch.bool else 0.0 if first.is_floating_point() else 0
            rest = [*args[1:], *kwargs.values()]
            target = next((x for x in rest if isinstance(x, torch.device)), None)
            if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.to) and target == torch.device("cpu"):
                self.to_cpu += 1
                dtype = next((x for x in rest if isinstance(x, torch.dtype)), first.dtype)
                return torch.zeros(first.shape, dtype=dtype)
        if kinds == {"meta", "cpu"} and func.overloadpacket not in (torch.ops.aten._to_copy, torch.ops.aten.to,
                                                                    torch.ops.aten.copy_):
            self.mixed.append(str(func))
        return func(*args, **kwargs)


def _enc(n: int = 24, labels: int = 5) -> Encoded:
    rng = np.random.default_rng(0)
    return Encoded(tuple(rng.integers(5, 100, size=int(rng.integers(4, 12))) for _ in range(n)),
                   rng.integers(0, labels, n))


def test_every_tensor_of_a_client_round_lives_on_the_models_device() -> None:
    """Model on the meta device: training steps, the optimizer state, evaluation and the FedNCM
    statistics run there; tensors leave it only at the wire (trainable_state) and as statistics."""
    from fedtune.head_init import class_feature_sums

    model = build_model(TINY, 5).to("meta")
    D.place(model, D.Placement(torch.device("meta")))
    enc, cfg = _enc(), TrainConfig(local_steps=2, batch_size=4)
    mode = MetaRound()
    with mode:
        opt = make_optimizer(model, cfg)
        run_steps(model, opt, warmup(opt, 0), BatchStream(enc, 4, 0, 0), 2)
        state_devices = {t.device.type for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
                         and t.dim() > 0}
        evaluate(model, enc, 8, 0)
        class_feature_sums(model, enc, 5, 8, 0)
        copies = mode.to_cpu
        state = trainable_state(model)
    assert mode.mixed == [] and state_devices == {"meta"}
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert copies == 2  # the round's losses (read once, at its end) and the head's input features (statistics)
    assert mode.to_cpu - copies == len(state) and all(t.device.type == "cpu" for t in state.values())


def test_a_bf16_base_with_fp32_adapters_trains_on_cpu() -> None:
    model = build_model(ModelConfig(model="tiny", lora_rank=4, base_dtype="bfloat16", device="cpu"), 5)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert frozen == {torch.bfloat16} and {p.dtype for _, p in trainable} == {torch.float32}
    assert D.placement_of(model).autocast is torch.bfloat16
    before = {n: p.detach().clone() for n, p in trainable}
    cfg = TrainConfig(local_steps=3, batch_size=8, lr=1e-2)
    opt = make_optimizer(model, cfg)
    losses = run_steps(model, opt, warmup(opt, 0), BatchStream(_enc(), 8, 0, 0), 3)
    assert all(np.isfinite(losses))
    assert {p.grad.dtype for _, p in trainable if p.grad is not None} == {torch.float32}
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    assert all(not torch.equal(before[n], p) for n, p in trainable if "lora_A" in n or "modules_to_save" in n)
    res = evaluate(model, _enc(), 8, 0)
    assert np.isfinite(res["loss"])


def test_cpu_autocast_auto_keeps_adapters_fp32(monkeypatch) -> None:
    monkeypatch.setattr(D, "cpu_has_bf16", lambda: True)
    model = build_model(ModelConfig(model="tiny", lora_rank=4, cpu_autocast="auto"), 5)
    assert D.placement_of(model).autocast is torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # only the computation is bf16
    stats = train_local(model, _enc(), TrainConfig(local_steps=2, batch_size=8), 0, 0)
    assert np.isfinite(stats["train_loss"])
    assert D.placement_of(build_model(TINY, 5)).autocast is None  # the default (off): as before


def test_base_quant_without_cuda_is_one_model_error() -> None:
    with pytest.raises(ModelError, match="base-quant='nf4': a bitsandbytes base needs a CUDA device"):
        build_model(ModelConfig(model="tiny", base_quant="nf4"), 5)
    with pytest.raises(ConfigError, match="a quantized base takes LoRA only"):
        from fedtune.config import build_config

        build_config({"model": "tiny", "adapter": "sparse", "base-quant": "int8"})


@pytest.mark.parametrize("setting, needle", [
    ("device=cuda", "bad value device='cuda': this process sees no CUDA device"),
    ("client-gpus=1", "bad value client-gpus=1.0: this machine has no CUDA device"),
    ("server-device=cuda:0", "bad value server-device='cuda:0'"),
    ("base-quant=nf4", "bad value base-quant='nf4'"),
    ("device=tpu", "must be auto, cpu, cuda or cuda:N"),
])
def test_cuda_requests_on_a_cpu_machine_are_one_line_exit_2(setting, needle, capsys, tmp_path) -> None:
    from fedtune.cli import main

    assert main(["simulate", "--preset", "tiny", "--set", setting, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fedtune: error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in err, err


def test_profiles_carry_a_device_and_cpu_edge_stays_on_cpu(quick_cfg) -> None:
    from fedtune.profiles import apply, lookup, parse_def

    cfg = quick_cfg.replace(profiles="gpu-small,cpu-edge", device="cuda")  # a GPU run (syntax only here)
    assert apply(cfg, lookup(cfg, "cpu-edge")).model.device == "cpu"
    assert apply(cfg, lookup(cfg, "gpu-small")).model.device == "cuda"
    p = parse_def("lab device=cuda:1 base-quant=nf4 lora-rank=32")
    assert (p.device, p.base_quant) == ("cuda:1", "nf4")
    with pytest.raises(ConfigError, match="must be auto, cpu, cuda or cuda:N"):
        parse_def("lab device=gpu lora-rank=4")
    assert quick_cfg.replace(**{"server-device": "cpu"}).model.server_device == "cpu"


def test_a_node_declared_device_wins(quick_cfg) -> None:
    from flwr.app import Context, RecordDict

    from fedtune.client.node import node_device
    from fedtune.deploy.join import JoinOptions, node_config

    opts = JoinOptions(superlink="h:1", ca=Path("ca"), key=Path("k"), partition_id=2, device="cpu")
    assert 'device="cpu"' in node_config(opts)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 2, "device": "cpu"}, state=RecordDict(),
                  run_config={})
    assert node_device(quick_cfg.replace(device="cuda"), ctx).model.device == "cpu"


def test_ray_address_goes_to_rays_init(quick_cfg) -> None:
    from fedtune.simulations.simulate import backend_config

    local = backend_config(quick_cfg)["init_args"]
    assert "address" not in local and local["num_cpus"] >= 1
    remote = backend_config(quick_cfg.replace(**{"ray-address": "auto", "client-gpus": 0.25}))
    assert remote["init_args"]["address"] == "auto" and "num_cpus" not in remote["init_args"]
    assert remote["client_resources"] == {"num_cpus": quick_cfg.federation.client_cpus, "num_gpus": 0.25}


def test_a_cuda_out_of_memory_fails_only_that_handler() -> None:
    from fedtune.client.gpu import oom_mod

    def boom(msg, ctx):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    with pytest.raises(RuntimeError, match=r"CUDA out of memory on cuda:\? \(this client's share: client-gpus\): "
                                           r"CUDA out of memory\. Tried to allocate 2\.00 GiB$"):
        oom_mod(None, None, boom)
    assert oom_mod("msg", "ctx", lambda m, c: (m, c)) == ("msg", "ctx")


def test_device_metrics_on_cpu() -> None:
    from fedtune import wire
    from fedtune.client.gpu import device_metrics

    assert device_metrics(build_model(TINY, 5)) == {wire.DEVICE_INDEX: -1, wire.GPU_PEAK: 0.0}


def test_bench_gpu_without_a_gpu_says_so_and_exits_0(tmp_path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--write", str(tmp_path / "b.md")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "no CUDA device" in r.stdout and not (tmp_path / "b.md").exists()


@pytest.mark.slow
def test_an_out_of_memory_client_fails_its_own_round(tmp_path) -> None:
    """A client whose training runs out of CUDA memory (injected: no GPU here) fails its own
    round with the reason in metrics.jsonl; the others and the server go on. Each replying
    client's profile and device are in the row."""
    import faulty_clients

    from fedtune.presets import resolve
    from fedtune.simulations.simulate import simulate

    cfg = resolve("tiny", overrides={"rounds": 2, "fraction-evaluate": 0.0})
    simulate(cfg, tmp_path, progress=lambda row: None, client_app=faulty_clients.oom_app)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    r1, r2 = rows[1], rows[2]
    assert len(r1["failures"]) == 1 and "CUDA out of memory" in r1["failures"][0] and r1["missing"] == [0]
    assert r1["aggregated"] and r2["failures"] == [] and r2["clients"] == 4
    assert [c["client"] for c in r1["client_devices"]] == [1, 2, 3]
    assert r2["client_devices"] == [{"client": c, "profile": "default", "device": "cpu"} for c in range(4)]


def test_gradient_checkpointing_recomputes_in_training_and_not_in_eval() -> None:
    """transformers checkpoints only in train mode (an 8B nf4 step peaked at 26.7 GiB instead of
    12.4 without model.train()): fedtune's training loop sets it, so each layer runs twice a step."""
    model = build_model(ModelConfig(model="tiny", lora_rank=4, gradient_checkpointing=True), 5)
    layer = next(m for n, m in model.named_modules() if n.endswith("encoder.layer.0.attention.self.key"))
    calls = []
    layer.register_forward_hook(lambda *a: calls.append(1))
    model.eval()  # as from_pretrained leaves a model
    opt = make_optimizer(model, TrainConfig())
    run_steps(model, opt, warmup(opt, 0), BatchStream(_enc(), 8, 0, 0), 2)
    assert len(calls) == 4  # forward + recompute, per step
    calls.clear()
    evaluate(model, _enc(n=8), 8, 0)
    assert len(calls) == 1
