"""Our `shvit-cpu` throughput next to the SHViT paper's own CPU (onnxruntime) figures.

    edgevit-export bench all --res 224 --protocol shvit-cpu --max-seconds 15 \
        --json benchmarks/results/shvit-cpu-224.json
    python benchmarks/shvit_cpu_ranking.py benchmarks/results/shvit-cpu-224.json

Prints a markdown table (every model we measured, by our throughput) with the paper's figure and
rank where the paper has the model, and the rank correlation over the models both have. Writes
``shvit-cpu-224.md`` beside the JSON.

The paper's figures (SHViT, CVPR 2024, Table 2, column "CPU_ONNX": Intel Xeon Gold 5218R, batch 16,
onnxruntime, images/s; its Table 3 for the distilled EfficientFormer-L1). The paper measured
SHViT-S4 and FastViT at 256 px, everything else at 224; our run is at 224 for all. Its speed-test
script sets one thread for PyTorch only, so its onnxruntime column may have used onnxruntime's
default thread pool; our protocol pins one intra-op thread.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PAPER_IMG_S = {  # model: (images/s, resolution the paper used)
    "shvit_s1": (1111, 224), "shvit_s2": (951, 224), "shvit_s3": (731, 224), "shvit_s4": (509, 256),
    "mobilenetv3_small_100": (1172, 224), "mobilenetv3_large_100": (613, 224),
    "efficientvit_m2": (781, 224), "efficientvit_m4": (616, 224), "efficientvit_m5": (456, 224),
    "fastvit_t8": (140, 256), "fastvit_t12": (92, 256),
    "efficientformerv2_s1": (325, 224), "efficientformer_l1": (274, 224),
    "edgevit_xxs": (168, 224), "edgevit_xs": (120, 224),
}


def ranks(values: dict[str, float]) -> dict[str, int]:
    order = sorted(values, key=lambda k: -values[k])
    return {k: i + 1 for i, k in enumerate(order)}


def spearman(a: dict[str, int], b: dict[str, int]) -> float:
    n = len(a)
    return 1 - 6 * sum((a[k] - b[k]) ** 2 for k in a) / (n * (n * n - 1))


def main(path: str) -> int:
    data = json.loads(Path(path).read_text())
    ours = {r["model"]: r for r in data["results"]}
    img_s = {m: r["images_per_s"] for m, r in ours.items()}
    common = [m for m in img_s if m in PAPER_IMG_S]
    our_rank = ranks({m: img_s[m] for m in common})
    paper_rank = ranks({m: PAPER_IMG_S[m][0] for m in common})
    lines = ["| model | MMACs | our img/s (224) | spread ms (p90 − p10) | runs | GFLOP/s | our rank | paper img/s | "
             "paper res | paper rank | ours / paper |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in sorted(img_s, key=lambda k: -img_s[k]):
        r = ours[m]
        runs = f"{r['runs']}" + (" (time cap)" if r.get("stopped_early") else "")
        if m in PAPER_IMG_S:
            p, pres = PAPER_IMG_S[m]
            tail = f"{our_rank[m]} | {p:,} | {pres} | {paper_rank[m]} | {img_s[m] / p:.2f} |"
        else:
            tail = "— | — | — | — | — |"
        lines.append(f"| {m} | {r['macs_per_image'] / 1e6:,.0f} | {img_s[m]:,.1f} | {r['spread_ms']:.1f} | {runs} | "
                     f"{r['gflops']:.0f} | {tail}")
    rho = spearman(our_rank, paper_rank)
    lines.append("")
    lines.append(f"Spearman rank correlation over the {len(common)} models both measured: {rho:.2f}. "
                 f"Environment: {data['environment'].get('cpu', '?')}, onnxruntime "
                 f"{data['environment'].get('onnxruntime', '?')}, {data['threads']} thread, batch 16.")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(path).with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/shvit-cpu-224.json"))
