"""`llm360 plan`: what a config needs of a cluster -- memory per GPU, checkpoint size and time, run time.

The front is :func:`plan` (``plan(cfg, cluster) -> Plan``); :func:`check_layout` is the set of
layout rules that `llm360 train` also applies at start-up, and :func:`device_peak_flops` names the
peak MFU is measured against. Everything comes from the model built on the meta device (shapes,
nothing allocated) and closed-form counts; no GPU is needed.

**Layout.** ``parallelism`` ddp | fsdp | hsdp times ``tensor_parallel`` t: t GPUs of one node
split every block's matrices (Megatron's column/row split, :mod:`llm360.train.tensor_parallel`:
each GPU keeps its own heads' and MLP width's activations; the residual stream, the norms, the
embedding and the head stay whole on every GPU of the group); the ``world / t`` data-parallel
ranks replicate the model (ddp),
shard it over all of them (fsdp) or inside groups of ``shard_group_size`` ranks and replicate across
groups (hsdp). The *shard degree* is 1, ``world / t`` or ``shard_group_size``.

**Memory per GPU, in bytes** (P parameters, of which the blocks' matrices are divided by t):

* parameters 4P, gradients 4P, AdamW's two moments 8P, each divided by the shard degree: the fp32
  parameters are the master weights (bf16 compute is autocast, so there is no second copy), 16
  bytes a parameter in all;
* communication buffers: DDP's gradient buckets (4 bytes a parameter: torch copies gradients into
  them, ``gradient_as_bucket_view`` off); FSDP's unsharded fp32 parameters and gradients of two
  blocks (the one computing and the one prefetched) and of the root (embedding, final norm, head),
  which stays gathered for the step;
* activations saved for backward, per micro-batch of b sequences of s tokens (N = b*s), for a
  LLaMA block of width h, a heads and k key/value heads of dim e, MLP width f. Each token keeps::

      A = 2 n h r + 2 h c + c [ (a + 2k) e + (a + k) e + 2 a e + 4 f ]    bytes per block

  with r = 4 (the residual stream is fp32: the embedding is, and bf16 branch outputs added to it
  promote), c = 2 under bf16 autocast (4 in fp32), n = 2 for RMSNorm (its input and the normalised
  value are kept) and 1 for LayerNorm. Term by term: each norm's input (RMSNorm's normalised value
  too) and the matmul input it feeds; q, k, v's matmul output (v is a view of it, which keeps it whole) and the rotated q, k;
  attention's output and its contiguous copy for o_proj; gate/up's output, silu(gate) and the
  product. This is the formula of Korthikanti et al. (2022, "Reducing Activation Recomputation in
  Large Transformer Models": 34 s b h + 5 a s^2 b per GPT layer in 16-bit) adapted to this model:
  SwiGLU for the 4h GELU MLP, no dropout, an fp32 residual, and no s^2 term because attention runs
  as flash / memory-efficient SDPA. Under tensor parallelism the first two terms (2 n h r + 2 h c)
  are whole on every GPU and the bracket is divided by t. Without activation checkpointing the L
  blocks keep N*A each; with it each keeps only its input (N h r) and one block is recomputed at a
  time;
* working copies: what a block's matmuls keep of the weights for backward -- under bf16 autocast the
  bf16 copy of every matrix (2 bytes a block parameter), in fp32 the concatenated q/k/v and gate/up
  weights (apart under tensor parallelism: no copy) -- for every block without checkpointing, one
  block with it;
* the loss: the chunked fused cross-entropy keeps its input's gradient (N h r) and the head's
  gradient (4 V h) from forward to backward, and works on chunks of 2^25 logits on GPU (2^21 on
  CPU) in fp32;
* the peak working set: the larger of the loss chunk's forward work and one block's backward
  (its recomputed activations and weight copies under checkpointing, plus gradient temporaries of
  N (2 h r + 2 f c)).

The total is compared with the GPU's memory less 2 GB (CUDA context, NCCL and cuBLAS workspaces)
and 10% for the allocator's fragmentation. The estimate is for eager mode; ``torch.compile``
fuses elementwise work and usually saves less. On CPU (fp32) it is within 20% of the measured peak
(tests/test_plan.py).

**Checkpoint.** fp32 weights (4P) plus AdamW's moments (8P), in safetensors files of at most
``train.checkpoint_shard_mb``; files go to ranks round-robin, so each rank writes at most
``ceil(files / world)`` of them. Times are at ``write_gbps`` per writing rank (the file system not
the bottleneck), for every rank writing its own files and for one rank writing everything.

**Time.** tokens/s = MFU x peak x GPUs / FLOPs per token (6N + 12 L h s, PaLM's count, recomputation
not counted); the run's tokens are the prepared data's (``--run-dir``), else the paper's for its
presets (Amber's mix table, 1259.1B; CrystalCoder's three stages, 1382B), else unknown.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from llm360.config import RunConfig, TrainConfig
from llm360.config.model import ModelConfig
from llm360.config.presets import AMBER_MIX_BTOKENS, CRYSTALCODER_STAGE_BTOKENS
from llm360.errors import ConfigError
from llm360.model.llama import Llama, flops_per_token, resolve_model_config

GB = 10**9

KNOWN_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H100", 989.0), ("H200", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L40", 181.0), ("L4", 121.0), ("MI300X", 1307.0),
)  # fmt: skip
"""Dense bf16 peaks in TFLOP/s by device-name fragment (first match wins: more specific names first)."""

DEFAULT_PEAK_TFLOPS = 989.0
"""The plan's default peak (H100/H200 SXM, dense bf16)."""

RESERVED_BYTES = 2 * GB
"""Memory a GPU gives no tensor: CUDA context, NCCL buffers, cuBLAS workspaces."""
FRAGMENTATION = 0.10
"""Share of the rest lost to the caching allocator's fragmentation."""
LOSS_CHUNK_ELEMENTS = {"cpu": 2**21, "cuda": 2**25}
"""Logits per chunk of the fused cross-entropy (as :func:`llm360.model.llama.linear_cross_entropy`)."""
PRESET_TOKENS = {
    "amber": round(sum(AMBER_MIX_BTOKENS.values()) * 1e9),
    "crystalcoder": round(sum(CRYSTALCODER_STAGE_BTOKENS.values()) * 1e9),
}
"""Tokens of the whole run for the paper's presets (before any data is prepared)."""


# ------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class Cluster:
    """The hardware a plan is for: GPU count and size, and the rates that turn work into time."""

    gpus: int
    """GPUs (ranks) in all."""
    gpus_per_node: int = 8
    gpu_memory_bytes: int = 80 * GB
    mfu: float = 0.40
    """Model FLOPs utilisation assumed for the run's duration."""
    peak_tflops: float = DEFAULT_PEAK_TFLOPS
    """Dense bf16 peak of one GPU, TFLOP/s."""
    write_gbps: float = 2.0
    """Checkpoint write rate of one writing rank, GB/s."""
    device: str = "cuda"
    """cuda (bf16 autocast when train.precision is auto) or cpu (fp32 unless bf16 is asked for)."""

    def usable_bytes(self) -> int:
        """Memory the plan may fill: less the reserve and the fragmentation share."""
        return int(max(0, self.gpu_memory_bytes - RESERVED_BYTES) * (1 - FRAGMENTATION))


@dataclass(frozen=True)
class Layout:
    """How the model is laid out over the GPUs, and how much of a step one forward pass takes."""

    parallelism: str = "ddp"
    """ddp, fsdp or hsdp."""
    tensor_parallel: int = 1
    shard_group_size: int | None = None
    activation_checkpointing: bool = False
    micro_batch_sequences: int = 1

    @classmethod
    def of(cls, tcfg: TrainConfig) -> Layout:
        return cls(tcfg.parallelism, tcfg.tensor_parallel, tcfg.shard_group_size,
                   tcfg.activation_checkpointing, tcfg.micro_batch_sequences)

    def data_parallel(self, world: int) -> int:
        return max(1, world // self.tensor_parallel)

    def shard_degree(self, world: int) -> int:
        """Ranks that split parameters, gradients and optimizer state (1: replicated)."""
        dp = self.data_parallel(world)
        if dp == 1 or self.parallelism == "ddp":
            return 1
        if self.parallelism == "hsdp" and self.shard_group_size:
            return self.shard_group_size
        return dp

    def overrides(self) -> list[str]:
        """The ``--set`` arguments that select this layout."""
        out = [f"train.parallelism={self.parallelism}", f"train.tensor_parallel={self.tensor_parallel}",
               f"train.shard_group_size={self.shard_group_size if self.shard_group_size else 'null'}",
               f"train.activation_checkpointing={str(self.activation_checkpointing).lower()}",
               f"train.micro_batch_sequences={self.micro_batch_sequences}"]
        return out

    def describe(self, world: int) -> str:
        what = {"ddp": "DDP", "fsdp": f"FSDP over {self.data_parallel(world)} ranks",
                "hsdp": f"HSDP, shard groups of {self.shard_group_size}"}[self.parallelism]
        tp = f" x tensor parallel {self.tensor_parallel}" if self.tensor_parallel > 1 else ""
        ac = ", activation checkpointing" if self.activation_checkpointing else ""
        return f"{what}{tp}{ac}, micro-batch {self.micro_batch_sequences}"


# ------------------------------------------------------------------------------ layout rules


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_layout(mcfg: ModelConfig, tcfg: TrainConfig | Layout, world: int, gpus_per_node: int | None,
                 global_batch: int) -> None:
    """Raise ConfigError, saying what would work, for a layout that cannot run on ``world`` ranks.

    The rules: the tensor-parallel degree divides the heads, the key/value heads and the MLP
    width and fits in a node; it divides the world size; an HSDP shard group divides the
    data-parallel ranks, holds at least two, and (times the tensor-parallel degree) fits in a node;
    HSDP needs several ranks; the global batch splits over the data-parallel ranks.
    ``gpus_per_node`` None: unknown (the node rules are not checked).
    """
    lay = tcfg if isinstance(tcfg, Layout) else Layout.of(tcfg)
    t, g = lay.tensor_parallel, lay.shard_group_size
    kv = mcfg.num_kv_heads or mcfg.num_heads
    if t > 1:
        for what, n in (("model.num_heads", mcfg.num_heads), ("the key/value heads (model.num_kv_heads)", kv),
                        ("model.intermediate_size", mcfg.intermediate_size)):
            if n % t:
                ok = [d for d in _divisors(math.gcd(mcfg.num_heads, kv, mcfg.intermediate_size))
                      if gpus_per_node is None or d <= gpus_per_node]
                raise ConfigError(
                    f"train.tensor_parallel = {t} does not divide {what} = {n}: every GPU of a tensor-parallel "
                    f"group takes whole heads and an equal share of the MLP; use one of {ok}"
                )
        if gpus_per_node is not None and t > gpus_per_node:
            raise ConfigError(
                f"train.tensor_parallel = {t} is more than the {gpus_per_node} GPUs of a node: tensor parallelism "
                f"communicates every layer and stays inside a node; use at most {gpus_per_node}, with fsdp or "
                "hsdp across nodes"
            )
    if world % t:
        below, above = world // t * t, (world // t + 1) * t
        degrees = [d for d in _divisors(math.gcd(world, mcfg.num_heads, kv, mcfg.intermediate_size))
                   if gpus_per_node is None or d <= gpus_per_node]
        raise ConfigError(
            f"{world} ranks do not split into tensor-parallel groups of train.tensor_parallel = {t}; run on a "
            f"multiple of {t} ranks ({', '.join(str(w) for w in (below, above) if w)}) or use a tensor_parallel "
            f"that divides {world} ({degrees})"
        )
    dp = world // t
    if lay.parallelism == "hsdp":
        if world == 1:
            raise ConfigError(
                "train.parallelism = hsdp needs several ranks (under torchrun) to shard over; on one process "
                "use parallelism = ddp (or fsdp, which is the same there)"
            )
        assert g is not None  # the train section's validator asks for it with hsdp
        if dp % g:
            ok = [d for d in _divisors(dp) if d >= 2 and (gpus_per_node is None or d * t <= gpus_per_node)]
            raise ConfigError(
                f"train.shard_group_size = {g} does not divide the {dp} data-parallel ranks ({world} ranks / "
                f"tensor_parallel {t}); use one of {ok}" + (", or parallelism = fsdp" if not ok else "")
            )
        if gpus_per_node is not None and g * t > gpus_per_node:
            ok = [d for d in _divisors(dp) if 2 <= d and d * t <= gpus_per_node]
            raise ConfigError(
                f"a shard group of train.shard_group_size = {g} ranks x tensor_parallel {t} = {g * t} GPUs is "
                f"larger than a node ({gpus_per_node} GPUs): HSDP shards inside a node and replicates across "
                f"nodes; use shard_group_size in {ok}" + (" or " if ok else "use ") + "parallelism = fsdp to "
                "shard across nodes"
            )
    if global_batch % dp:
        fits = _divisors(global_batch)
        near = [max((d for d in fits if d < dp), default=None), min((d for d in fits if d > dp), default=None)]
        ranks = " or ".join(f"{d * t} ranks" for d in near if d is not None)
        raise ConfigError(
            f"train.global_batch_sequences = {global_batch} does not split over {dp} data-parallel ranks "
            f"({world} ranks / tensor_parallel {t}): every rank takes an equal share of each global batch; run on "
            f"{ranks} ({t} x a divisor of {global_batch}), or set global_batch_sequences to a multiple of {dp} "
            f"({-(-global_batch // dp) * dp})"
        )


def check_trainer_supports(tcfg: TrainConfig, world: int) -> None:
    """Raise ConfigError for a layout `llm360 plan` evaluates but the trainer does not run on ``world`` ranks."""
    t = tcfg.tensor_parallel
    if t > 1 and tcfg.parallelism == "ddp" and world // t > 1:
        raise ConfigError(
            f"train.parallelism = ddp with train.tensor_parallel = {t} on {world} ranks: the trainer shards "
            f"the {world // t} data-parallel copies of a tensor-parallel model with FSDP; set parallelism = fsdp "
            f"(or hsdp), or run on {t} ranks (tensor parallel alone)"
        )


def peak_tflops_by_name(name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``name`` (as torch.cuda.get_device_name says), or None."""
    for fragment, tflops in KNOWN_PEAK_TFLOPS:
        if fragment.lower() in name.lower():
            return tflops
    return None


def device_peak_flops(tcfg: TrainConfig, device: torch.device) -> float | None:
    """FLOP/s that MFU divides by for one device: ``train.peak_tflops`` when set, else the known peak
    of the CUDA device by name; None (no MFU) for an unknown GPU or a CPU without a configured peak."""
    if tcfg.peak_tflops is not None:
        return tcfg.peak_tflops * 1e12
    if device.type == "cuda":
        tflops = peak_tflops_by_name(torch.cuda.get_device_name(device))
        return None if tflops is None else tflops * 1e12
    return None


# ------------------------------------------------------------------------------ the model's shapes


@dataclass(frozen=True)
class ModelShapes:
    """Parameter counts of a model by role, read from the model built on the meta device."""

    mcfg: ModelConfig
    parameters: int
    """All parameters (tied ones once)."""
    block: int
    """Parameters of one block."""
    block_matrices: int
    """Of those, in matrices (split by tensor parallelism; the norms are replicated)."""
    root: int
    """Embedding, final norm and head (tied: once)."""
    fused_copies: int
    """Elements of one block's concatenated q/k/v and gate/up weights (its fp32 working copies)."""

    @classmethod
    def of(cls, mcfg: ModelConfig) -> ModelShapes:
        with torch.device("meta"):
            model = Llama(mcfg)
        params = dict(model.named_parameters())  # tied parameters once
        block = {n: p for n, p in params.items() if n.startswith("model.layers.0.")}
        mats = sum(p.numel() for p in block.values() if p.ndim >= 2)
        fused = sum(p.numel() for n, p in block.items() if n.endswith(("q_proj.weight", "k_proj.weight",
                    "v_proj.weight", "gate_proj.weight", "up_proj.weight")))  # fmt: skip
        total = sum(p.numel() for p in params.values())
        return cls(mcfg, total, sum(p.numel() for p in block.values()), mats,
                   total - mcfg.num_layers * sum(p.numel() for p in block.values()), fused)

    def split(self, t: int) -> int:
        """Parameters on one GPU of a tensor-parallel group of t (the blocks' matrices split; norms,
        embedding and head whole)."""
        split = self.mcfg.num_layers * self.block_matrices
        return split // t + (self.parameters - split)

    def vocab_params(self) -> int:
        v, h = self.mcfg.vocab_size or 0, self.mcfg.hidden_size
        return v * h * (1 if self.mcfg.tie_embeddings else 2)


# ------------------------------------------------------------------------------ the estimate


@dataclass
class Memory:
    """Bytes on one GPU at the step's peak, by what holds them (they sum to ``total``)."""

    parameters: int
    gradients: int
    optimizer: int
    communication_buffers: int
    activations: int
    working_copies: int
    loss_buffers: int
    peak_working_set: int
    activations_with_checkpointing: int = field(default=0)
    """For comparison: the activations line with activation checkpointing on (not in the total)."""
    activations_without_checkpointing: int = field(default=0)
    """For comparison: the activations line with activation checkpointing off (not in the total)."""

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.communication_buffers
                + self.activations + self.working_copies + self.loss_buffers + self.peak_working_set)


def computes_in_bf16(tcfg: TrainConfig, device: str) -> bool:
    """Whether training computes in bf16 on a device of this type (``cuda``, ``cpu``): asked for, or auto on CUDA."""
    return tcfg.precision == "bf16" or (tcfg.precision == "auto" and device == "cuda")


def _dtype_bytes(tcfg: TrainConfig, device: str) -> int:
    """c, the bytes of a compute element: 2 under bf16 autocast, else 4."""
    return 2 if computes_in_bf16(tcfg, device) else 4


def memory(shapes: ModelShapes, tcfg: TrainConfig, lay: Layout, world: int, seq_len: int, device: str) -> Memory:
    """The per-GPU memory of one layout (see the module docstring for every term)."""
    m = shapes.mcfg
    t, L = lay.tensor_parallel, m.num_layers
    h, f, a, V = m.hidden_size, m.intermediate_size, m.num_heads, m.vocab_size or 0
    k, e = m.num_kv_heads or a, m.hidden_size // m.num_heads
    r, c = 4, _dtype_bytes(tcfg, device)
    n_norm = 2 if m.norm == "rmsnorm" else 1
    shard = lay.shard_degree(world)
    dp = lay.data_parallel(world)
    p_gpu = shapes.split(t)
    N = min(lay.micro_batch_sequences, max(1, tcfg.global_batch_sequences // dp)) * seq_len

    whole = 2 * n_norm * h * r + 2 * h * c  # the norms' and matmul inputs: the same on every GPU of a group
    split = c * ((a + 2 * k) * e + (a + k) * e + 2 * a * e + 4 * f)  # each GPU's own heads and MLP width
    block_acts = N * (whole + split // t)
    fused = 4 * shapes.fused_copies if t == 1 else 0  # (tensor parallelism runs the projections apart)
    copy_bytes = (c * shapes.block_matrices if c < 4 else fused) // t
    ckpt_acts = L * N * h * r + N * n_norm * h * r  # block inputs + the final norm
    full_acts = L * block_acts + N * n_norm * h * r
    backward_temps = N * (2 * h * r + 2 * f * c // t)
    rows = min(N, max(1, LOSS_CHUNK_ELEMENTS.get(device, 2**25) // max(V, 1)))
    loss_work = rows * V * (8 + (c if c < 4 else 0)) + V * h * c + (V * h * c if c < 4 else 0)

    if lay.activation_checkpointing:
        acts, copies = ckpt_acts, 0
        work = max(loss_work, block_acts + copy_bytes + backward_temps)
    else:
        acts, copies = full_acts, L * copy_bytes
        work = max(loss_work, backward_temps)
    comm = 0
    if world > 1 and shard == 1:
        comm = 4 * p_gpu  # DDP's gradient buckets
    elif shard > 1:
        comm = 4 * 2 * (2 * shapes.block // t + shapes.root)  # unsharded params + grads being computed
    return Memory(
        parameters=4 * p_gpu // shard, gradients=4 * p_gpu // shard, optimizer=8 * p_gpu // shard,
        communication_buffers=comm, activations=acts, working_copies=copies,
        loss_buffers=N * h * r + 4 * V * h, peak_working_set=work,
        activations_with_checkpointing=ckpt_acts, activations_without_checkpointing=full_acts,
    )


@dataclass
class Plan:
    """What one config needs of one cluster (see the module docstring for how each figure is made)."""

    model: dict[str, Any]
    cluster: dict[str, Any]
    layout: dict[str, Any]
    memory: dict[str, int]
    per_gpu_bytes: int
    usable_bytes: int
    fits: bool
    smallest_fitting: dict[str, Any] | None
    advice: str
    checkpoint: dict[str, Any]
    throughput: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        """(what, value) lines for a person: the memory per GPU, the checkpoint and the run's time."""
        m, ck, tp = self.memory, self.checkpoint, self.throughput
        ac = "on" if self.layout["activation_checkpointing"] else "off"
        out = [(f"{k.replace('_', ' ')}", _gb(m[k])) for k in (
            "parameters", "gradients", "optimizer", "communication_buffers", "activations", "working_copies",
            "loss_buffers", "peak_working_set")]
        other = m["activations_without_checkpointing" if ac == "on" else "activations_with_checkpointing"]
        out += [("per GPU", f"{_gb(self.per_gpu_bytes)} of {_gb(self.usable_bytes)} usable"),
                (f"activations (checkpointing {ac}; the other setting)", f"{_gb(m['activations'])}; {_gb(other)}"),
                ("checkpoint", f"{_gb(ck['bytes'])} in {ck['files']} files (weights {_gb(ck['model_bytes'])}, "
                               f"AdamW {_gb(ck['optimizer_bytes'])})"),
                ("save time", f"{ck['seconds_every_rank_writing']:.1f} s with {ck['writing_ranks']} ranks writing "
                              f"{_gb(ck['bytes_per_rank_max'])} each; {ck['seconds_one_rank_writing']:.1f} s from one "
                              f"rank (at {ck['write_gbps_per_rank']:g} GB/s a rank)"),
                ("throughput", f"{tp['tokens_per_s']:,.0f} tokens/s at MFU {tp['mfu']:.0%} of "
                               f"{tp['peak_tflops']:g} TFLOP/s; {tp['seconds_per_step']:.2f} s a step")]
        if tp["days"] is not None:
            out.append(("run", f"{tp['tokens'] / 1e9:,.1f}B tokens, {tp['steps']:,} steps: {tp['days']:.1f} days"))
        else:
            out.append(("run", "tokens unknown (give --tokens, or --run-dir of prepared data)"))
        return out


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def _layout_json(lay: Layout, world: int, tcfg: TrainConfig) -> dict[str, Any]:
    dp = lay.data_parallel(world)
    per_rank = max(1, tcfg.global_batch_sequences // dp)
    micro = min(lay.micro_batch_sequences, per_rank)
    return {"parallelism": lay.parallelism, "tensor_parallel": lay.tensor_parallel,
            "shard_group_size": lay.shard_group_size, "data_parallel": dp, "shard_degree": lay.shard_degree(world),
            "activation_checkpointing": lay.activation_checkpointing, "micro_batch_sequences": micro,
            "micro_batches_per_step": math.ceil(per_rank / micro), "describe": lay.describe(world),
            "overrides": lay.overrides()}


def candidate_layouts(shapes: ModelShapes, tcfg: TrainConfig, world: int, gpus_per_node: int) -> list[Layout]:
    """Every valid layout of ``world`` ranks, smallest first: less tensor parallelism, then fewer
    ranks per shard (ddp, hsdp by group size, fsdp), then no activation checkpointing before
    checkpointing, then the largest micro-batch (the configured one, then the divisors of a rank's
    batch below it)."""
    m = shapes.mcfg
    out: list[tuple[tuple, Layout]] = []
    for t in _divisors(world):
        if t > gpus_per_node:
            break
        dp = world // t
        per_rank = max(1, tcfg.global_batch_sequences // dp)
        micros = sorted({min(tcfg.micro_batch_sequences, per_rank)}
                        | {d for d in _divisors(per_rank) if d < tcfg.micro_batch_sequences}, reverse=True)
        shardings: list[tuple[str, int | None]] = [("ddp", None)]
        shardings += [("hsdp", g) for g in _divisors(dp) if 2 <= g < dp and g * t <= gpus_per_node]
        if dp > 1:
            shardings.append(("fsdp", None))
        for par, g in shardings:
            for ac in (False, True):
                for mb in micros:
                    lay = Layout(par, t, g, ac, mb)
                    try:
                        check_layout(m, lay, world, gpus_per_node, tcfg.global_batch_sequences)
                    except ConfigError:
                        continue
                    out.append(((t, lay.shard_degree(world), ac, -mb), lay))
    return [lay for _, lay in sorted(out, key=lambda x: x[0])]


def _checkpoint(shapes: ModelShapes, tcfg: TrainConfig, cluster: Cluster) -> dict[str, Any]:
    model_b, opt_b = 4 * shapes.parameters, 8 * shapes.parameters
    shard_b = int(tcfg.checkpoint_shard_mb * 10**6)
    files = math.ceil(model_b / shard_b) + math.ceil(opt_b / shard_b)
    per_rank = min(model_b + opt_b, math.ceil(files / cluster.gpus) * shard_b)
    rate = cluster.write_gbps * GB
    return {"bytes": model_b + opt_b, "model_bytes": model_b, "optimizer_bytes": opt_b, "shard_bytes": shard_b,
            "files": files, "writing_ranks": min(files, cluster.gpus), "bytes_per_rank_max": per_rank,
            "write_gbps_per_rank": cluster.write_gbps, "seconds_every_rank_writing": per_rank / rate,
            "seconds_one_rank_writing": (model_b + opt_b) / rate}


def _throughput(mcfg: ModelConfig, tcfg: TrainConfig, seq_len: int, cluster: Cluster, tokens: int | None) -> dict:
    fpt = flops_per_token(mcfg, seq_len)
    tps = cluster.mfu * cluster.peak_tflops * 1e12 * cluster.gpus / fpt
    step_tokens = tcfg.global_batch_sequences * seq_len
    out: dict[str, Any] = {"flops_per_token": fpt, "peak_tflops": cluster.peak_tflops, "mfu": cluster.mfu,
                           "tokens_per_s": tps, "seconds_per_step": step_tokens / tps, "tokens": tokens,
                           "steps": None, "days": None}
    if tokens:
        out["steps"] = tokens // step_tokens
        out["days"] = tokens / tps / 86400
    return out


def run_tokens(cfg: RunConfig) -> int | None:
    """The run's tokens from the config alone: the paper's count for its presets, else None."""
    return PRESET_TOKENS.get(cfg.preset or "")


def plan_model_config(cfg: RunConfig) -> ModelConfig:
    """The model config with the vocabulary and sequence length it will have (the tokenizer's when null)."""
    vocab = cfg.model.vocab_size or cfg.data.tokenizer.vocab_size
    return resolve_model_config(cfg.model, vocab, cfg.data.seq_len)


def plan(cfg: RunConfig, cluster: Cluster, *, tokens: int | None = None, layout: Layout | None = None) -> Plan:
    """Memory per GPU, fit, the smallest layout that fits, checkpoint size and time, and run time.

    ``layout``: the one to evaluate (default: the config's train section); ``tokens``: the run's
    tokens (default: :func:`run_tokens`). Raises ConfigError for a layout that cannot run on
    ``cluster.gpus`` ranks (:func:`check_layout`), saying what would.
    """
    tcfg, world = cfg.train, cluster.gpus
    mcfg = plan_model_config(cfg)
    lay = layout or Layout.of(tcfg)
    check_layout(mcfg, lay, world, cluster.gpus_per_node, tcfg.global_batch_sequences)
    shapes = ModelShapes.of(mcfg)
    seq = cfg.data.seq_len
    mem = memory(shapes, tcfg, lay, world, seq, cluster.device)
    usable = cluster.usable_bytes()
    fits = mem.total <= usable
    smallest, best = None, None
    for cand in candidate_layouts(shapes, tcfg, world, cluster.gpus_per_node):
        cm = memory(shapes, tcfg, cand, world, seq, cluster.device)
        if cm.total <= usable:
            smallest, best = cand, cm
            break
    gb = f"{mem.total / GB:.1f} GB"
    room = f"{usable / GB:.1f} GB usable of {cluster.gpu_memory_bytes / GB:.0f} GB"
    if fits:
        advice = f"fits: {gb} per GPU, {room}"
        if smallest is not None and smallest != lay:
            advice += f"; the smallest layout that fits is {smallest.describe(world)}"
    elif smallest is not None:
        advice = (f"does not fit: {gb} per GPU, {room}. The smallest layout that fits ({best.total / GB:.1f} GB): "
                  f"{smallest.describe(world)}; set " + " ".join(f"--set {o}" for o in smallest.overrides()))
    else:
        advice = (f"does not fit: {gb} per GPU, {room}, and no layout of {world} GPUs does; use more GPUs, "
                  "larger ones, or a smaller model or sequence")
    sm = None
    if smallest is not None:
        sm = {**_layout_json(smallest, world, tcfg), "per_gpu_bytes": best.total}
    p = shapes.parameters
    return Plan(
        model={"name": mcfg.name, "parameters": p, "num_layers": mcfg.num_layers, "hidden_size": mcfg.hidden_size,
               "vocab_size": mcfg.vocab_size, "seq_len": seq, "compute_bytes": _dtype_bytes(tcfg, cluster.device)},
        cluster=asdict(cluster), layout=_layout_json(lay, world, tcfg),
        memory={**{k: v for k, v in asdict(mem).items()}, "total": mem.total},
        per_gpu_bytes=mem.total, usable_bytes=usable, fits=fits, smallest_fitting=sm, advice=advice,
        checkpoint=_checkpoint(shapes, tcfg, cluster),
        throughput=_throughput(mcfg, tcfg, seq, cluster, tokens if tokens is not None else run_tokens(cfg)),
    )


def startup_check(cfg: RunConfig, world: int, gpus_per_node: int | None, device: torch.device) -> Plan | None:
    """What `llm360 train` checks before it loads anything: the layout rules, what the trainer can
    run, and -- knowing the device's memory (CUDA's own, or ``train.device_memory_gb``) -- that the
    plan fits. Raises ConfigError with the plan's advice; returns the plan, or None when no memory
    figure is known (CPU without ``train.device_memory_gb``)."""
    tcfg = cfg.train
    mcfg = plan_model_config(cfg)
    check_layout(mcfg, tcfg, world, gpus_per_node, tcfg.global_batch_sequences)
    check_trainer_supports(tcfg, world)
    if tcfg.device_memory_gb is not None:
        mem = int(tcfg.device_memory_gb * GB)
    elif device.type == "cuda":
        mem = torch.cuda.get_device_properties(device).total_memory
    else:
        return None
    cluster = Cluster(gpus=world, gpus_per_node=gpus_per_node or world, gpu_memory_bytes=mem,
                      device=device.type)
    p = plan(cfg, cluster)
    if not p.fits:
        raise ConfigError(
            f"this layout does not fit the device's memory ({world} x {mem / GB:.0f} GB): {p.advice} "
            "(`llm360 plan CONFIG --gpus N` shows the whole estimate)"
        )
    return p


__all__ = ["Cluster", "Layout", "Memory", "Plan", "check_layout", "check_trainer_supports", "device_peak_flops",
           "plan", "startup_check"]
