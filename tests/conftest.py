import os
import sys

# One thread per process: ranks share the machine's cores, and forked workers must not inherit
# a started OpenMP pool.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
import pytest  # noqa: E402
import transformers  # noqa: E402,F401

# Import the heavy modules once, here, so forked workers start with them loaded.
import megatron_patch.convert.hf_megatron  # noqa: E402,F401
import megatron_patch.forward  # noqa: E402,F401
from megatron_patch import cpu_mode  # noqa: E402
from megatron_patch import tiny as tiny_models  # noqa: E402

# The test process is an entry point like `megatron-patch train`: it registers rlhf's training
# modes (rm, dpo), which the tests' Trainers and `training.arguments.parse_args` run.
from megatron_patch.rlhf import modes as rlhf_modes  # noqa: E402,F401

# CPU mode on in the test process, before any worker is forked (entry points switch it on
# explicitly: importing megatron_patch does not).
cpu_mode.maybe_enable()

# Tests leave no process behind: the session fails otherwise (process_check.py).
pytest_plugins = ["process_check"]

TOKENS_SEED = 1234
BATCH, SEQ = 2, 32


def _prepare(root: str, variants: list[str]) -> None:
    """In a worker: save each tiny HF model, its transformers reference output, and convert it."""
    import torch

    from megatron_patch.convert.hf_megatron import hf_to_megatron

    for variant in variants:
        hf_dir = os.path.join(root, variant, "hf")
        tiny_models.make_hf_model(hf_dir, variant)
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        gen = torch.Generator().manual_seed(TOKENS_SEED)
        tokens = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=gen)
        with torch.no_grad():
            out = model(input_ids=tokens, labels=tokens)
        torch.save({"tokens": tokens, "logits": out.logits, "loss": out.loss.item()},
                   os.path.join(root, variant, "reference.pt"))
        hf_to_megatron(hf_dir, os.path.join(root, variant, "mcore"))


@pytest.fixture(scope="session")
def llama_models(tmp_path_factory) -> dict[str, str]:
    """variant -> directory holding hf/ (HF model), mcore/ (converted) and reference.pt."""
    root = str(tmp_path_factory.mktemp("llama"))
    variants = list(tiny_models.LLAMA_VARIANTS)
    harness.run(_prepare, 1, root, variants)
    return {v: os.path.join(root, v) for v in variants}


@pytest.fixture(scope="session")
def zoo_models(tmp_path_factory) -> dict[str, str]:
    """Every zoo case (tests/zoo/) -> directory holding hf/ (its original format), mcore/ (its
    conversion) and reference.pt (the oracle's logits). Shared by the zoo and API tests."""
    import zoo

    root = str(tmp_path_factory.mktemp("zoo"))
    harness.run(zoo.prepare, 1, root, list(zoo.CASES))
    return {name: os.path.join(root, name) for name in zoo.CASES}


# `pytest -m fast`: the inner-loop subset (under 3 minutes on the 2-core development machine),
# chosen to run code in every megatron_patch module (rlhf/ppo.py's only in the RL runs) without
# the multi-minute training, RL and launcher runs. A test module's name marks all of its tests;
# "module::test" one test (and all of its parametrizations).
FAST_TESTS = (
    "test_import_structure", "test_family_configs", "test_fast_modules", "test_rl_math",
    "test_megatron_core_contract", "test_norm_head", "test_model_pieces",
    "test_cpu_mode::test_cpu_patches_under_tp2", "test_cpu_mode::test_wanted_follows_environment",
    "test_cpu_mode::test_rng_context_warning_is_filtered_and_others_are_not",
    "test_cpu_mode::test_importing_the_library_patches_nothing",
    "test_conversion::test_transforms", "test_conversion::test_check_names_reports_unset_targets",
    "test_conversion::test_file_regions_and_safetensors_writer",
    "test_conversion::test_placeholders_refuse_to_be_read",
    "test_conversion::test_conversion_errors_name_the_problem",
    "test_conversion::test_input_formats_dtypes_and_sharded_output",
    "test_reward_model::test_score_positions_follow_transformers_pooling",
    "test_reward_model::test_bradley_terry_loss_and_metrics_by_hand",
    "test_reward_model::test_every_family_maps_its_score_head_or_is_refused_with_the_reason",
    "test_dpo::test_losses_and_metrics_equal_trl", "test_dpo::test_bad_flags_are_refused",
    "test_dpo::test_launcher_builds_the_dpo_command",
    "test_moe::test_layout_refuses_experts_not_divisible_by_ep",
    "test_moe::test_qwen2_moe_refuses_dense_layers_and_sliding_window",
    "test_moe::test_qwen3_moe_refuses_what_it_cannot_reproduce",
    "test_moe::test_deepseek_v3_released_config",
    "test_moe::test_deepseek_refuses_what_it_cannot_reproduce",
    "test_moe::test_bind_expands_every_expert_and_refuses_one_sided_placeholders",
    "test_moe::test_launcher_starts_tp_x_pp_x_ep_cpu_processes",
    "test_gpt_oss::test_released_config", "test_gpt_oss::test_refuses_what_it_cannot_reproduce",
    "test_gpt_oss::test_stacked_expert_transforms",
    "test_bad_inputs::test_launcher_refuses_zero_sizes_in_one_line",
    "test_bad_inputs::test_train_subcommand_takes_its_flags",
    "test_bad_inputs::test_unexpected_errors_are_one_line_and_debug_shows_the_traceback",
    "test_bad_inputs::test_no_float_flag_accepts_nan_or_inf",
    "test_bad_inputs::test_float_flags_are_range_checked_by_argparse",
    "test_bad_inputs::test_split_refuses_non_finite_weights",
    "test_bad_inputs::test_sft_reads_line_by_line_and_skips_surrogates_and_bad_bytes",
    "test_bad_inputs::test_generation_prompts_are_held_to_sft_message_rules",
    "test_everyday::test_prompt_files_formats_and_errors",
    "test_everyday::test_quiet_by_default_verbose_brings_the_rest_back",
    "test_everyday::test_wandb_flag_without_wandb_is_a_clear_error",
    "test_everyday::test_use_flash_attn_selection_and_refusals",
    "test_everyday::test_tp1_linears_train_through_torch_autograd_with_megatrons_gradients",
    "test_sft::test_bad_records_name_file_and_line",
    "test_sft::test_each_epoch_is_a_new_shuffle_whatever_the_split_and_on_resume",
    "test_preprocess::test_launcher_usage_on_wrong_argument_count",
    "test_preprocess::test_round_trip_hf_tokenizer_1_and_2_workers",
    "test_training::test_a_split_without_documents_is_refused",
    "test_training::test_a_registered_mode_brings_its_flags_and_choice",
    "test_training::test_first_step_loss_equals_transformers",
    "test_generation::test_logits_processors_match_transformers",
    "test_megatron_lm_import::test_megatron_lm_rope_scaling_is_megatron_cores",
    "test_vocab_extension::test_special_tokens_after_the_vocabulary_keep_their_ids",
    "test_verify_cli::test_verify_passes_at_tp2_with_sp",
    "test_api::test_memory_stays_within_one_tensor",
    "test_api::test_api_names_are_the_package_attributes",
    "test_bad_inputs::test_reward_function_misbehaviour_is_an_error_naming_it_and_the_record",
    "test_bad_inputs::test_a_non_finite_reward_sum_names_the_prompt_or_is_skipped",
    "test_rl::test_first_ratio_is_one_and_rollout_logprobs_equal_the_trainers",
    "test_rl::test_kl_bias_correction_is_refused_for_ppo",
    "test_megatron_lm_import::test_megatron_lm_bad_inputs_are_clear_errors",
    "test_gpt_oss::test_mxfp4_checkpoint_imports_dequantised",
    "test_lora::test_bad_lora_inputs_are_refused_clearly",
    "test_dpo::test_bad_pairs_name_file_and_line",
    "test_training::test_resume_is_exact",
    "test_vocab_extension::test_cli_word_list_and_errors",
)


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in FAST_TESTS or f"{module}::{item.originalname}" in FAST_TESTS:
            item.add_marker(pytest.mark.fast)
