"""A training loop of one's own on megatron-patch's Python API: build a Hugging Face family as a
Megatron-Core model at tensor parallel size TP, load its HF weights in memory, train on a text
file, save a checkpoint, and export the trained weights back to an HF directory.

    torchrun --nproc-per-node 2 examples/custom_training/train.py \\
        --hf-dir path/to/hf_model --text-file corpus.txt --tp 2 --steps 20 \\
        --save ckpt --export trained_hf

Tensor parallelism only, so plain torch AdamW is right as it is: each rank updates its own
shards, and the replicated weights (norms) get the same gradient on every rank. For data
parallelism wrap the model in Megatron-Core's DistributedDataParallel and use its optimizer.
"""

import argparse

import torch

from megatron_patch import api
from megatron_patch.logs import library_warnings


def batches(tokenizer, path: str, seq_length: int, batch_size: int):
    """Endless batches of consecutive seq_length + 1 token windows of the file."""
    with open(path) as f:
        ids = tokenizer(f.read())["input_ids"]
    windows = [ids[i:i + seq_length + 1] for i in range(0, len(ids) - seq_length, seq_length)]
    if not windows:
        raise ValueError(f"{path}: fewer than {seq_length + 1} tokens")
    while True:
        for i in range(0, len(windows), batch_size):
            yield torch.tensor(windows[i:i + batch_size])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, help="HF model directory (weights, tokenizer)")
    parser.add_argument("--text-file", required=True, help="plain-text training data")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--save", required=True, help="checkpoint directory to write")
    parser.add_argument("--export", required=True, help="HF directory to write at the end")
    parser.add_argument("--verbose", action="store_true",
                        help="also show the libraries' warnings (megatron-core's about "
                             "Transformer Engine and Apex, deprecations)")
    args = parser.parse_args()
    # Scoped to this run: the process's warning filters are restored afterwards.
    with library_warnings(args.verbose):
        train(args)


def train(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    api.initialize_parallel(tensor_model_parallel_size=args.tp)
    rank = torch.distributed.get_rank()
    (model,) = api.build_model(args.hf_dir)
    api.load_hf_weights(model, args.hf_dir)
    vocab_size = api.model_info(model).vocab_size
    data = batches(AutoTokenizer.from_pretrained(args.hf_dir), args.text_file, args.seq_length,
                   args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    model.train()
    for step in range(1, args.steps + 1):
        batch = next(data)
        tokens, labels = batch[:, :-1], batch[:, 1:]
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        # [batch, seq, vocab / TP]: each rank holds its slice of the vocabulary.
        logits = model(tokens, positions, attention_mask=None)
        loss = api.vocab_parallel_loss(logits, labels, vocab_size).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)

    api.save_checkpoint(model, args.save, iteration=args.steps)
    api.save_hf_pretrained(model, args.export)
    if rank == 0:
        print(f"saved {args.save} and exported {args.export}", flush=True)
    api.destroy_parallel()


if __name__ == "__main__":
    main()
