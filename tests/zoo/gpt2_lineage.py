"""BLOOM, Falcon (7B and 40B styles), StarCoder / SantaCoder (GPT-BigCode) and Galactica (OPT)
against their native transformers classes.

These families have biases, which transformers initialises to zero: the builders here give every
bias random values, so a bias that is dropped or misplaced changes the logits. Multi-query
models (one KV head) are built with their KV head copied gcd(heads, 8) times (here 4), so that
TP=2 splits them too.
"""

from zoo import Case, Layout, native


def with_random_biases(build):
    def wrapped():
        import torch

        model = build()
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") and "norm" not in name and "ln" not in name:
                    p.copy_(torch.empty_like(p).uniform_(-0.1, 0.1, generator=gen))
        return model

    return wrapped


def _native(arch, **config):
    return with_random_biases(native(arch, **config))


BLOOM = dict(vocab_size=1000, hidden_size=96, n_layer=4, n_head=6, layer_norm_epsilon=1e-5)
FALCON = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
              max_position_embeddings=256, rope_theta=10000.0, bias=False, alibi=False)
BIGCODE = dict(vocab_size=1000, n_embd=64, n_layer=4, n_head=4, n_positions=256,
               activation_function="gelu_pytorch_tanh", bos_token_id=0, eos_token_id=0,
               # No dropout, so that training curves can be compared across layouts.
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
OPT = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
           ffn_dim=128, max_position_embeddings=256, word_embed_proj_dim=64,
           do_layer_norm_before=True, enable_bias=True,
           # No dropout, so that training curves can be compared across layouts.
           dropout=0.0, attention_dropout=0.0)

CASES = [
    # 6 heads: not a power of two, so ALiBi's extra slopes are used; at TP=2 each rank has 3.
    Case("bloom", _native("BloomForCausalLM", **BLOOM)),
    # Falcon-7B style: one shared input LayerNorm, multi-query.
    Case("falcon7b_style", _native("FalconForCausalLM", **FALCON, multi_query=True,
                                   new_decoder_architecture=False, parallel_attn=True)),
    # Falcon-40B style: ln_attn + ln_mlp, 2 KV groups.
    Case("falcon40b_style", _native("FalconForCausalLM", **FALCON, num_kv_heads=2,
                                    new_decoder_architecture=True)),
    # Falcon2-11B style: the new architecture with one shared norm.
    Case("falcon_new_one_norm", _native("FalconForCausalLM", **FALCON, num_kv_heads=2,
                                        new_decoder_architecture=True,
                                        num_ln_in_parallel_attn=1),
         layouts=(Layout(2, 1, sp=True),)),
    # The old architecture without multi-query (a [q, k, v] block per head), sequential
    # (parallel_attn: false, as falcon-rw), with biases.
    Case("falcon_sequential_mha", _native("FalconForCausalLM", **{**FALCON, "bias": True},
                                          multi_query=False, new_decoder_architecture=False,
                                          parallel_attn=False)),
    Case("starcoder", _native("GPTBigCodeForCausalLM", **BIGCODE, multi_query=True)),
    Case("gpt_bigcode_mha", _native("GPTBigCodeForCausalLM", **BIGCODE, multi_query=False)),
    Case("galactica", _native("OPTForCausalLM", **OPT, activation_function="gelu")),
    Case("opt_relu", _native("OPTForCausalLM", **OPT, activation_function="relu"),
         layouts=(Layout(1, 1),)),
    Case("opt_no_bias", _native("OPTForCausalLM", **{**OPT, "enable_bias": False},
                                activation_function="relu"), layouts=(Layout(2, 1, sp=True),)),
]
