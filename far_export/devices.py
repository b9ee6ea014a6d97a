"""Published peak figures of the devices far-export targets, for `far-export budget`'s lower bounds.

Dense tensor-core throughput (datasheets print "with sparsity" figures: halved here, as their footnotes
say), GPU only (a Jetson's DLA excluded), per precision a graph runs at: fp32 graphs at TF32 (TensorRT
enables TF32 for fp32 layers by default, BuilderFlag.TF32), fp16 / bf16 at FP16 / BF16, int8 at INT8.
Each device names its source. Where NVIDIA publishes no figure (every Orin's TF32 and BF16, the Orin Nano
and NX FP16 tensor rate) the figure is derived and `derived` says how: FP16 tensor = dense INT8 / 2 (the
ratio the AGX Orin data sheet prints: "170 INT8 Sparse TOPS or 85 Sparse FP16 TFLOPS"); BF16 = FP16 and
TF32 = FP16 / 2 (the Ampere ratios of the A100 datasheet: 312 / 312 / 156 dense TFLOPS).
"""

from __future__ import annotations

from dataclasses import dataclass, field

T = 1e12  # TFLOPS / TOPS
GB = 1e9


@dataclass(frozen=True)
class Device:
    name: str
    memory: float  # bytes
    bandwidth: float  # bytes/s
    peaks: dict[str, float] = field(default_factory=dict)  # graph precision -> FLOP/s (dense)
    source: str = ""
    derived: str = ""

    def peak(self, precision: str) -> float:
        return self.peaks[precision]


def _ampere_derived(int8: float) -> dict[str, float]:
    fp16 = int8 / 2
    return {"fp32": fp16 / 2, "fp16": fp16, "bf16": fp16, "int8": int8}


GiB = 2**30
ORIN_DERIVED = "TF32, FP16 and BF16 derived from the dense INT8 figure (see the module docstring)"

DEVICES: tuple[Device, ...] = (
    Device(
        "Jetson Orin Nano 8GB",  # 15 W, JetPack 6.0/6.1
        memory=8 * GiB,
        bandwidth=68 * GB,
        peaks=_ampere_derived(20 * T),
        source="Jetson Orin Nano Series Modules Data Sheet DS-11105-001 v1.5: '20 INT8 TOPs' dense, 68 GB/s, "
        "8 GiB",
        derived=ORIN_DERIVED,
    ),
    Device(
        "Jetson Orin Nano 8GB Super",  # 25 W MAXN_SUPER, JetPack 6.2
        memory=8 * GiB,
        bandwidth=102 * GB,
        peaks=_ampere_derived(33 * T),
        source="Jetson Orin Nano Series Modules Data Sheet DS-11105-001 v1.5: '33 INT8 TOPs (MAXN_SUPER)' "
        "dense, 102 GB/s (MAXN_SUPER)",
        derived=ORIN_DERIVED,
    ),
    Device(
        "Jetson Orin NX 16GB",  # 25 W
        memory=16 * GiB,
        bandwidth=102 * GB,
        peaks=_ampere_derived(30 * T),
        source="Jetson Orin NX Series Modules Data Sheet DS-10712-001 v1.5: '50 INT8 TOPs' dense for the "
        "module less its 2 DLAs' '40 TOPS' sparse (20 dense), 102 GB/s",
        derived="GPU INT8 = module minus DLA; " + ORIN_DERIVED,
    ),
    Device(
        "Jetson AGX Orin 64GB",  # MAXN
        memory=64 * GB,
        bandwidth=204.8 * GB,
        peaks={"fp32": 21.25 * T, "fp16": 42.5 * T, "bf16": 42.5 * T, "int8": 85 * T},
        source="Jetson AGX Orin Series Modules Data Sheet DS-10662-001 v1.6: 'Up to 170 INT8 Sparse TOPS or "
        "85 Sparse FP16 TFLOPS (Tensor Cores)', 204.8 GB/s, 64 GB",
        derived="TF32 and BF16 derived from FP16 (see the module docstring)",
    ),
    Device(
        "NVIDIA L4",
        memory=24 * GB,
        bandwidth=300 * GB,
        peaks={"fp32": 60 * T, "fp16": 121 * T, "bf16": 121 * T, "int8": 242.5 * T},
        source="NVIDIA L4 Tensor Core GPU datasheet and https://www.nvidia.com/en-us/data-center/l4/: TF32 "
        "120*, FP16 / BF16 242*, INT8 485* (*with sparsity), 24 GB, 300 GB/s",
    ),
    Device(
        "NVIDIA H100 SXM 80GB",
        memory=80 * GB,
        bandwidth=3350 * GB,
        peaks={"fp32": 494.7 * T, "fp16": 989.4 * T, "bf16": 989.4 * T, "int8": 1978.9 * T},
        source="NVIDIA H100 Tensor Core GPU Architecture whitepaper v1.04, dense figures (TF32 494.7, BF16 / "
        "FP16 989.4, INT8 1978.9); H100 datasheet: 80 GB, 3.35 TB/s",
    ),
    Device(
        "NVIDIA H200 SXM 141GB",
        memory=141 * GB,
        bandwidth=4800 * GB,
        peaks={"fp32": 494.5 * T, "fp16": 989.5 * T, "bf16": 989.5 * T, "int8": 1979 * T},
        source="NVIDIA H200 Tensor Core GPU datasheet: TF32 989*, FP16 / BF16 1,979*, INT8 3,958* (*with "
        "sparsity), 141 GB, 4.8 TB/s",
    ),
)
