"""The tokenizer files vocabulary extension reads and writes: their names, sentencepiece's piece
types and the sentencepiece model proto."""

from __future__ import annotations

SP_MODEL = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
SPACE = "\u2581"  # sentencepiece's "▁", which stands for a space inside pieces
# sentencepiece_model_pb2.ModelProto.SentencePiece.Type
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED, SP_UNUSED, SP_BYTE = 1, 2, 3, 4, 5, 6
SP_BPE = 2  # TrainerSpec.ModelType


def load_sp_proto(path: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto
