"""The hardware a plan runs on: a GPU from the catalog in conf/gpu/, or this machine, measured.

`load_hardware(cluster)` reads conf/gpu/<cluster.gpu>.yaml (datasheet figures: [GPU catalog] in
docs/formulas.md), or, for `gpu: auto`, probes the local machine: its CUDA GPU when there is one,
else the CPU (measured matmul FLOP/s per dtype, memory copy bandwidth, available RAM), so that
profile -> estimate -> search runs end to end on a laptop. Cluster-level figures (GPUs per node,
nodes, link and host memory overrides) come from the ClusterConfig.
"""
from __future__ import annotations

import contextlib
import functools
import re
import time
from dataclasses import asdict, dataclass, field, replace

import psutil
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.nn.attention import SDPBackend, sdpa_kernel

from autotune.config import CONF_DIR, ClusterConfig
from autotune.engine.config import ConfigError

GiB = 1024**3
DTYPES = ("fp32", "tf32", "bf16", "fp16")
# Bus bandwidth between ranks on one host when there is no GPU link: gloo over loopback TCP moves
# a few GB/s at large messages; the first calibration replaces it.
CPU_GLOO_BYTES_PER_S = 2e9
# NCCL runs a ring collective on one CTA per channel; 16 channels is its usual count on NVLink
# nodes, each holding one SM the overlapped compute cannot use [Communication].
NCCL_CHANNELS = 16
# One collective's latency inside a node: nccl-tests all-reduce of a few bytes on 8 NVLink GPUs
# takes tens of microseconds; across nodes the estimate doubles it.
COLLECTIVE_LATENCY_S = 20e-6
# Host time to dispatch one op in eager PyTorch on a GPU: a kernel launch through the CUDA driver
# takes about 5 us [Fixed overheads].
DISPATCH_S = 5e-6
# The share of a network port's line rate NCCL's rings reach at large messages: "for NDR @ 400Gbps
# you should see 46-48GB/s per NIC" (NCCL's maintainer, NVIDIA/nccl-tests issue #290, 2025), the low
# end taken (the cluster files' 46 GB/s for NDR 400 Gb/s, 23 for HDR 200) [GPU catalog].
NETWORK_EFFICIENCY = 0.92
# torch.cuda.get_device_name() -> its conf/gpu entry, first match wins ("NVIDIA H100 80GB HBM3" is
# the SXM part, "NVIDIA H100 PCIe" the PCIe one; PCIe A100s have the SXM parts' peaks).
CUDA_NAMES = (
    (r"H100.*PCIe", "h100-pcie"),
    # the 96 GB HBM2e part: its bandwidth is the entry's; its power cap (500 W) is what Meta's run
    (r"H100.*HBM2e", "h100-sxm-96g-500w"),
    (r"H100", "h100-sxm"),
    (r"H200", "h200"),
    (r"A100.*40GB", "a100-40g"),
    (r"A100", "a100-80g"),
    (r"A10G", "a10g"),
    (r"L40S", "l40s"),
    (r"\bL4\b", "l4"),
    (r"RTX 4090", "rtx-4090"),
    (r"V100.*32GB", "v100-32g"),
)


@dataclass
class Hardware:
    """Per-GPU figures plus the shape of the cluster. Rates are bytes/s and FLOP/s."""

    gpu: str
    device: str  # cuda | cpu
    memory_bytes: int
    hbm_bytes_per_s: float  # device memory bandwidth (copy: bytes read + written per second)
    peak_flops: dict[str, float] = field(default_factory=dict)  # dense peak per dtype (fp32, tf32, bf16, fp16; fp8 where it has float8)
    matmul_efficiency: float = 0.8  # achieved fraction of the peak on large matmuls
    fp8_matmul_efficiency: float = 0.0  # the same of float8 GEMMs (torch._scaled_mm); 0: no float8
    attention_efficiency: float = 0.5  # achieved fraction of the peak by SDPA (FLOPs it executes, causal half)
    cudnn_attention_efficiency: float = 0.0  # the same of cuDNN's fused attention (plan.attention=cudnn); 0: unknown
    memory_efficiency: float = 0.9  # achieved fraction of hbm_bytes_per_s by memory-bound kernels
    overlap_slowdown: float = 0.0  # compute lost while a collective runs beside it: NCCL's channels / SMs
    sms: int = 0  # streaming multiprocessors, over which GEMM tiles are quantized; 0: a CPU (no tiling model)
    tensor_flops_per_clock: float = 0.0  # dense 16-bit tensor FLOPs a clock per SM (attention's exp/matmul balance)
    collective_latency_s: float = COLLECTIVE_LATENCY_S  # fixed cost of one collective (small messages)
    intra_node_bytes_per_s: float = 0.0  # collective bus bandwidth inside a node
    inter_node_bytes_per_s: float = 0.0  # collective bus bandwidth per GPU across nodes
    host_device_bytes_per_s: float = 0.0  # PCIe (or memcpy on a CPU)
    gpus_per_node: int = 1
    nodes: int = 1
    host_memory_bytes: int = 0  # per node
    measured: bool = False  # True: probed on this machine; False: catalog datasheet
    collectives: dict[str, float] = field(default_factory=dict)  # measured bus bytes/s (under torchrun)
    # host time to dispatch one op of the eager engine (a CUDA launch takes ~5 us; a local device's
    # is measured on the engine's own block: autotune.device_prior)
    dispatch_s: float = DISPATCH_S
    # "precision/kernels" -> what that modelled compute is multiplied by on this device: measured on
    # the engine's own block for a local device (autotune.device_prior); empty (1) for a catalog GPU
    compute_scale: dict[str, float] = field(default_factory=dict)

    @property
    def n_gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def achieved_flops(self, dtype: str) -> float:
        return self.peak_flops[dtype] * self.matmul_efficiency

    def to_dict(self) -> dict:
        return asdict(self) | {"n_gpus": self.n_gpus}


def supported_precisions(hw: Hardware) -> list[str]:
    """Dtypes the device trains in: a CPU does fp32 and bf16; a GPU fp32, fp16, and bf16 where it
    has bf16 units (faster than its fp32: not on a V100, which only emulates it)."""
    if hw.device == "cpu":
        return ["fp32", "bf16"]
    flops = hw.peak_flops
    return ["fp32", "fp16"] + (["bf16"] if flops.get("bf16", 0) > flops.get("fp32", 0) else [])


def supports_fp8(hw: Hardware) -> bool:
    """Whether the device has float8 tensor cores (a float8 peak in its catalog entry: Hopper on)."""
    return hw.peak_flops.get("fp8", 0.0) > 0 and hw.fp8_matmul_efficiency > 0


def fp8_modes(hw: Hardware) -> list[str]:
    """The plan.fp8 values the search tries on the device: every recipe where it has float8."""
    return ["none", "tensorwise", "rowwise"] if supports_fp8(hw) else ["none"]


def attention_kernels(hw: Hardware) -> list[str]:
    """The plan.attention values the search tries on the device: cuDNN's too where the catalog or the
    probe has its figure (a CUDA GPU whose cuDNN runs fused attention)."""
    return ["sdpa", "cudnn"] if hw.device == "cuda" and hw.cudnn_attention_efficiency > 0 else ["sdpa"]


def check_fp8(hw: Hardware, modes) -> None:
    """Refuse float8 plans (plan.fp8 values other than none) on a device without float8."""
    used = sorted({str(m) for m in modes} - {"none"})
    if used and not supports_fp8(hw):
        raise ConfigError(f"plan.fp8={used[0]}: {hw.gpu} has no float8 tensor cores (no fp8 peak in its catalog "
                          "entry, conf/gpu/); use plan.fp8=none or a GPU with float8 (H100, H200)")


def gpu_catalog() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "gpu").glob("*.yaml"))


def load_hardware(cluster: ClusterConfig) -> Hardware:
    """The Hardware of `cluster`: its catalog GPU, or this machine probed (`gpu: auto`)."""
    if cluster.gpus_per_node < 1 or cluster.nodes < 1:
        raise ConfigError(
            f"cluster {cluster.name!r} has {cluster.nodes} node(s) x {cluster.gpus_per_node} GPU(s); "
            "set cluster.nodes and cluster.gpus_per_node to at least 1"
        )
    base = probe_local() if cluster.gpu == "auto" else catalog_gpu(cluster.gpu)
    hw = replace(base, gpus_per_node=cluster.gpus_per_node, nodes=cluster.nodes)
    if cluster.intra_node_gbps is not None:
        hw.intra_node_bytes_per_s = cluster.intra_node_gbps * 1e9
    # Without a figure for the network: the catalog GPU's (its reference server's port per GPU), or,
    # on this machine, as fast as its own links
    if cluster.inter_node_gbps is not None:
        hw.inter_node_bytes_per_s = cluster.inter_node_gbps * 1e9
    elif not hw.inter_node_bytes_per_s:
        hw.inter_node_bytes_per_s = hw.intra_node_bytes_per_s
    if cluster.host_memory_gb is not None:
        hw.host_memory_bytes = int(cluster.host_memory_gb * 1e9)
    return hw


def network_bytes_per_s(line_rate_gbps: float) -> float:
    """The bus bandwidth per GPU a collective reaches across nodes over a port of this line rate (Gb/s)."""
    return line_rate_gbps / 8 * 1e9 * NETWORK_EFFICIENCY


def port_gbps(hw: Hardware) -> float:
    """The line rate (Gb/s) of the network port whose bus bandwidth is hw.inter_node_bytes_per_s."""
    return hw.inter_node_bytes_per_s * 8 / 1e9 / NETWORK_EFFICIENCY


def catalog_gpu(name: str) -> Hardware:
    """Datasheet figures of conf/gpu/<name>.yaml."""
    path = CONF_DIR / "gpu" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown gpu {name!r}; available: auto, {', '.join(gpu_catalog())}")
    try:
        d = OmegaConf.to_container(OmegaConf.load(path))
        return Hardware(
            gpu=d["name"], device="cuda", memory_bytes=int(d["memory_gib"] * GiB),
            hbm_bytes_per_s=d["hbm_gbps"] * 1e9,
            peak_flops={k: float(d["tflops"][k]) * 1e12 for k in (*DTYPES, "fp8") if k in d["tflops"]},
            matmul_efficiency=float(d["matmul_efficiency"]),
            fp8_matmul_efficiency=float(d.get("fp8_matmul_efficiency", 0.0)),
            attention_efficiency=float(d["attention_efficiency"]),
            cudnn_attention_efficiency=float(d.get("cudnn_attention_efficiency", 0.0)),
            memory_efficiency=float(d["memory_efficiency"]),
            overlap_slowdown=NCCL_CHANNELS / int(d["sms"]), sms=int(d["sms"]),
            tensor_flops_per_clock=float(d["sm_tensor_flops_per_clock"]),
            intra_node_bytes_per_s=d["intra_node_gbps"] * 1e9,
            inter_node_bytes_per_s=network_bytes_per_s(float(d["network_gbps"])),
            host_device_bytes_per_s=d["host_device_gbps"] * 1e9,
            host_memory_bytes=0, measured=False,
        )
    except (OmegaConfBaseException, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a valid GPU entry ({e!r}); see conf/gpu/h100-sxm.yaml for the fields")


def catalog_gpu_of(device_name: str) -> Hardware | None:
    """The catalog entry of a CUDA device (by its torch.cuda.get_device_name); None for "cpu" or a
    GPU the catalog lacks."""
    for pattern, entry in CUDA_NAMES:
        if re.search(pattern, device_name):
            return catalog_gpu(entry)
    return None


def _time(fn, reps: int) -> float:
    """The fastest of reps runs of fn() after one warm-up, in seconds: a machine shared with other
    work only ever slows a run down, so the fastest is the device's own speed (a median moved 20x
    between two probes of this project's shared 2-core CPU)."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def _matmul_flops(n: int, dtype: torch.dtype, device: str, reps: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / _time(lambda: a @ b, reps)


def _attention_flops(b: int, heads: int, s: int, d: int, dtype: torch.dtype, device: str, reps: int,
                     backend: SDPBackend | None = None) -> float:
    """FLOP/s that causal SDPA forward + backward executes: 2·b·a·s²·d forward (the causal half of
    two s x s x d matmuls), 2.5 times that backward (the estimate's count, autotune.estimate).
    backend: the one kernel to run (None: SDPA's own choice)."""
    q, k, v = (torch.randn(b, heads, s, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def step():
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    return 3.5 * 2 * b * heads * s * s * d / _time(step, reps)


def _copy_bytes_per_s(nbytes: int, device: str, reps: int) -> float:
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _time(lambda: dst.copy_(src), reps)  # bytes read + written


def measure_collectives(nbytes: int = 64 * 2**20, reps: int = 5) -> dict[str, float]:
    """Bus bandwidth (bytes/s) of all-reduce, all-gather and reduce-scatter over the default process
    group, with nccl-tests' factors ([Communication] in docs/formulas.md): busbw = bytes/time ·
    2(n−1)/n for all-reduce, (n−1)/n for the others (bytes = the full, gathered size)."""
    import torch.distributed as dist

    n = dist.get_world_size()
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    numel = nbytes // 4 // n * n
    full = torch.ones(numel, device=device)
    part = torch.ones(numel // n, device=device)
    ops = {
        "all_reduce": (lambda: dist.all_reduce(full), 2 * (n - 1) / n),
        "all_gather": (lambda: dist.all_gather_into_tensor(full, part), (n - 1) / n),
        "reduce_scatter": (lambda: dist.reduce_scatter_tensor(part, full), (n - 1) / n),
    }
    out = {}
    for name, (op, factor) in ops.items():
        dist.barrier()
        seconds = _time(op, reps)
        times = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        out[name] = numel * 4 * factor / times.item()
    return out


@functools.cache
def probe_local() -> Hardware:
    """Measure this machine once per process: its first CUDA GPU, or the CPU.

    Peaks are the measured matmul rates, so matmul_efficiency is 1 (the figures already are what
    is achieved); causal SDPA's measured rate over that peak is the attention efficiency, and the
    measured copy bandwidth makes the memory efficiency 1. On a CPU, memory is the RAM available now and the "device" bandwidth is memcpy.
    Under torchrun (a process group of several ranks) the collectives are measured too, and the
    all-reduce bus bandwidth becomes the intra-node link.
    """
    import torch.distributed as dist

    hw = _probe_device()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        hw.collectives = measure_collectives()
        hw.intra_node_bytes_per_s = hw.collectives["all_reduce"]
    return hw


def _probe_device() -> Hardware:
    host = psutil.virtual_memory().available
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        flops = {
            "fp32": _matmul_flops(4096, torch.float32, "cuda", 5),
            "bf16": _matmul_flops(8192, torch.bfloat16, "cuda", 5),
            "fp16": _matmul_flops(8192, torch.float16, "cuda", 5),
        }
        allow = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        flops["tf32"] = _matmul_flops(4096, torch.float32, "cuda", 5)
        torch.backends.cuda.matmul.allow_tf32 = allow
        pinned = torch.empty(256 * 2**20 // 4, pin_memory=True)
        gpu_buf = torch.empty_like(pinned, device="cuda")
        h2d = pinned.numel() * 4 / _time(lambda: gpu_buf.copy_(pinned, non_blocking=True), 5)
        attention = _attention_flops(2, 16, 4096, 128, torch.bfloat16, "cuda", 5)
        try:
            cudnn = _attention_flops(2, 16, 4096, 128, torch.bfloat16, "cuda", 5, SDPBackend.CUDNN_ATTENTION)
        except RuntimeError:  # no cuDNN attention for this GPU or build
            cudnn = 0.0
        return Hardware(
            gpu=props.name, device="cuda", memory_bytes=props.total_memory,
            hbm_bytes_per_s=_copy_bytes_per_s(1 << 30, "cuda", 5), peak_flops=flops, matmul_efficiency=1.0,
            attention_efficiency=min(attention / flops["bf16"], 1.0),
            cudnn_attention_efficiency=min(cudnn / flops["bf16"], 1.0), memory_efficiency=1.0,
            overlap_slowdown=NCCL_CHANNELS / props.multi_processor_count, sms=props.multi_processor_count,
            intra_node_bytes_per_s=h2d, host_device_bytes_per_s=h2d, host_memory_bytes=host, measured=True,
        )
    fp32 = _matmul_flops(384, torch.float32, "cpu", 5)
    flops = {
        "fp32": fp32, "tf32": fp32,
        "bf16": _matmul_flops(256, torch.bfloat16, "cpu", 3),
        "fp16": _matmul_flops(256, torch.float16, "cpu", 3),
    }
    copy = _copy_bytes_per_s(64 * 2**20, "cpu", 5)
    attention = _attention_flops(1, 2, 128, 32, torch.float32, "cpu", 3)
    return Hardware(
        gpu="cpu", device="cpu", memory_bytes=host, hbm_bytes_per_s=copy, peak_flops=flops,
        matmul_efficiency=1.0, attention_efficiency=min(attention / fp32, 1.0), memory_efficiency=1.0,
        intra_node_bytes_per_s=CPU_GLOO_BYTES_PER_S, host_device_bytes_per_s=copy, host_memory_bytes=host, measured=True,
    )
