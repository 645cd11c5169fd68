"""The similarity judge's copy penalty on ACLSum's validation split: can a copy of the abstract still win?

    .venv/bin/python benchmarks/judge_copy.py                  # the table of docs/stage2.md (~20 s on 2 cores)
    .venv/bin/python benchmarks/judge_copy.py --generate 2     # + 2 SFT-model candidates per abstract (~10 min)
    .venv/bin/python benchmarks/judge_copy.py --samples benchmarks/results/judge_copy.json   # reuse them

SCORE = cosine(response, abstract) - copy_penalty * copy_fraction(response, abstract), as the similarity judge
computes it (common/judges/similarity.py: MiniLM, normalized embeddings; common.metrics.copy_fraction: the share of
the response's 4-grams found in the abstract). For each validation abstract it scores: ACLSum's human summary, the
abstract verbatim, its first half (by words), the abstract behind the prefix the DPO model learned ("The abstract is
summarized as follows: "), and its first sentence; with `--generate K`, also K samples of the SFT model
(models/smollm2-135m-instruct, HF generate with stage 1's template and sampling) — what stage 2 actually pairs.
Per text kind and penalty: mean and 10th percentile of SCORE, the share at or above `quality_threshold` (counts as
faithful), and the share that loses to the human summary under common.pairing.decide with the quickstart's rule.
Validation split only: the penalty is chosen here, never on test.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.config import REPO, load_config  # noqa: E402
from common.judges.similarity import penalized  # noqa: E402
from common.metrics import copy_fraction  # noqa: E402
from common.pairing import decide  # noqa: E402

PREFIX = "The abstract is summarized as follows: "
PENALTIES = (0.0, 0.3, 0.4, 0.5, 0.7)


def kinds(rows: list[dict]) -> dict[str, list[str]]:
    ab = [r["abstract"] for r in rows]
    return {
        "human summary": [r["summary"] for r in rows],
        "abstract verbatim": ab,
        "abstract, first half": [" ".join(a.split()[:len(a.split()) // 2]) for a in ab],
        "prefix + abstract": [PREFIX + a for a in ab],
        "abstract, first sentence": [a.split(". ")[0].rstrip(".") + "." for a in ab],
    }


def sft_samples(rows: list[dict], k: int, gen_cfg) -> list[tuple[int, str]]:
    """(row index, text): k samples per abstract from the SFT model, stage 1's template and sampling, seeded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(gen_cfg.sampling.seed)
    path = str(REPO / gen_cfg.model.path)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    out = []
    for i, r in enumerate(rows):
        msgs = [{"role": "user", "content": gen_cfg.prompt.template.format(text=r["abstract"])}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=False)
        with torch.no_grad():
            gen = model.generate(ids, do_sample=True, temperature=gen_cfg.sampling.temperature,
                                 top_p=gen_cfg.sampling.top_p, max_new_tokens=gen_cfg.sampling.max_tokens,
                                 num_return_sequences=k, pad_token_id=tok.eos_token_id)
        out += [(i, tok.decode(g[ids.shape[1]:], skip_special_tokens=True).strip()) for g in gen]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generate", type=int, default=0, help="SFT-model samples per abstract (0 = none)")
    ap.add_argument("--samples", help="reuse the SFT samples (sft_samples) of an earlier --generate run's JSON")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/judge_copy.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    judge_cfg = load_config("02_judge", str(REPO / "configs/quickstart/02_judge.yaml"), [])
    rule = judge_cfg.pairing
    rows = [json.loads(line) for line in open(REPO / "data/aclsum/val.jsonl")]
    texts = {k: list(enumerate(v)) for k, v in kinds(rows).items()}
    if args.samples:
        at = {r["id"]: i for i, r in enumerate(rows)}
        saved = json.loads(Path(args.samples).read_text())["sft_samples"]
        args.generate = len(saved) // len(rows)
        texts[f"SFT model sample ({args.generate} per abstract)"] = [(at[x["id"]], x["text"]) for x in saved]
    elif args.generate:
        gen_cfg = load_config("01_generate", str(REPO / "configs/quickstart/01_generate.yaml"), [])
        texts[f"SFT model sample ({args.generate} per abstract)"] = sft_samples(rows, args.generate, gen_cfg)

    model = SentenceTransformer(str(REPO / judge_cfg.judge.similarity.embedder), device="cpu")
    src = model.encode([r["abstract"] for r in rows], normalize_embeddings=True)

    def scored(pairs):  # (cosine, copy fraction, words) per text
        idx = [i for i, _ in pairs]
        emb = model.encode([t for _, t in pairs], normalize_embeddings=True)
        cos = np.einsum("ij,ij->i", emb, src[idx])
        cp = np.array([copy_fraction(t, rows[i]["abstract"]) or 0.0 for i, t in pairs])
        return idx, cos, cp, np.array([len(t.split()) for _, t in pairs])

    parts = {k: scored(v) for k, v in texts.items()}
    _, h_cos, h_cp, h_words = parts["human summary"]
    result = {"split": "val", "abstracts": len(rows), "quality_threshold": rule.quality_threshold, "kinds": {}}
    for kind, (idx, cos, cp, words) in parts.items():
        result["kinds"][kind] = {"n": len(idx), "copy_mean": float(cp.mean()), "words_mean": float(words.mean())}
        for p in PENALTIES:
            s = np.array([penalized(x, c, p) for x, c in zip(cos, cp)])
            h = np.array([penalized(x, c, p) for x, c in zip(h_cos, h_cp)])
            loses = np.mean([decide(s[j], words[j], h[i], h_words[i], rule)[0] < 0 for j, i in enumerate(idx)])
            result["kinds"][kind][f"penalty_{p:g}"] = {
                "mean": float(s.mean()), "p10": float(np.percentile(s, 10)),
                "faithful": float(np.mean(s >= rule.quality_threshold)), "loses_to_human": float(loses)}
    # One row per text, one column per penalty: mean (10th percentile) of SCORE; share >= threshold; share losing.
    print(f"cell: mean SCORE (10th percentile); share >= quality_threshold {rule.quality_threshold:g}; "
          f"share losing to the human summary under the quickstart's pairing rule\n")
    print("| text (validation, n) | copy share | words | " + " | ".join(f"penalty {p:g}" for p in PENALTIES) + " |")
    print("|---|---|---|" + "---|" * len(PENALTIES))
    for kind, k in result["kinds"].items():
        cells = []
        for p in PENALTIES:
            c = k[f"penalty_{p:g}"]
            lose = "—" if kind == "human summary" else f"{c['loses_to_human']:.0%}"
            cells.append(f"{c['mean']:.2f} ({c['p10']:.2f}); {c['faithful']:.0%}; {lose}")
        print(f"| {kind} ({k['n']}) | {k['copy_mean']:.2f} | {k['words_mean']:.0f} | " + " | ".join(cells) + " |")
    if args.generate:  # what stage 2 would make of the samples: pairs among each abstract's samples, by branch
        sft = f"SFT model sample ({args.generate} per abstract)"
        idx, cos, cp, words = parts[sft]
        print(f"\n{sft}, pairs among one abstract's samples: quality / length / tie; chosen - rejected copy share")
        for p in PENALTIES:
            s = [penalized(x, c, p) for x, c in zip(cos, cp)]
            branch, copy_gap = {"quality": 0, "length": 0, "tie": 0}, []
            for a in range(len(idx)):
                for b in range(a + 1, len(idx)):
                    if idx[a] == idx[b]:
                        v, kind = decide(s[a], words[a], s[b], words[b], rule)
                        branch[kind if v else "tie"] += 1
                        if v:  # what the pair teaches about copying: > 0 rewards it
                            copy_gap.append(v * (cp[a] - cp[b]))
            result["kinds"][sft][f"penalty_{p:g}"]["pairs"] = branch
            result["kinds"][sft][f"penalty_{p:g}"]["chosen_minus_rejected_copy"] = float(np.mean(copy_gap))
            print(f"  penalty {p:g}: {branch['quality']} / {branch['length']} / {branch['tie']}; "
                  f"{np.mean(copy_gap):+.3f}")
        # Stage 4's situation: a model that copies against the SFT model, on the same abstract.
        print(f"\n{PREFIX!r} + abstract vs an {sft} of the same abstract (copy wins / ties / loses):")
        _, c_cos, c_cp, c_words = parts["prefix + abstract"]
        for p in PENALTIES:
            s = [penalized(x, c, p) for x, c in zip(cos, cp)]
            c = [penalized(x, k, p) for x, k in zip(c_cos, c_cp)]
            v = [decide(c[i], c_words[i], s[j], words[j], rule)[0] for j, i in enumerate(idx)]
            wtl = [sum(x > 0 for x in v), sum(x == 0 for x in v), sum(x < 0 for x in v)]
            result["kinds"]["prefix + abstract"][f"penalty_{p:g}"]["vs_sft_wins_ties_losses"] = wtl
            print(f"  penalty {p:g}: {wtl[0]} / {wtl[1]} / {wtl[2]}")
        result["sft_samples"] = [{"id": rows[i]["id"], "text": t} for i, t in texts[sft]]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
