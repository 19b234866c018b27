//! The planner against its references: Megatron's FLOPs formula, Korthikanti et al.'s activation
//! table, published Hugging Face configs, the published runs, and bad input.

use plan::hardware::lookup;
use plan::memory::layer_activation_bytes;
use plan::model::{from_hf_config, from_toml, gpt, preset};
use plan::validate::{validate, PUBLISHED_RUNS_CSV};
use plan::{predict, search, FlopsConvention, Job, Layout, PlanError, Precision, Recompute, Software};

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-300)
}

#[test]
fn model_flops_equal_megatrons_72_formula_for_gpt() {
    // (layers, hidden, heads, vocab, seq, batch): GPT-3 175B, the 1T model, a small one.
    for (l, h, a, v, s, b) in [
        (96u64, 12288u64, 96u64, 51200u64, 2048u64, 1536u64),
        (128, 25600, 160, 51200, 2048, 3072),
        (24, 2048, 16, 131072, 4096, 8),
    ] {
        let m = gpt("t", l, h, a, v);
        let ours = m.model_flops_per_token(s, FlopsConvention::Megatron) * (b * s) as f64;
        let (bf, sf, lf, hf, vf) = (b as f64, s as f64, l as f64, h as f64, v as f64);
        let megatron = 72.0 * bf * sf * lf * hf * hf * (1.0 + sf / (6.0 * hf) + vf / (12.0 * lf * hf));
        assert!(close(ours, megatron, 1e-12), "{ours} vs {megatron}");
        // HFU with full recomputation is Narayanan et al.'s 96·B·s·l·h²·(1 + s/6h + V/16lh).
        let hfu = ours + m.recompute_flops_per_token(s, Recompute::Full) * (b * s) as f64;
        let narayanan = 96.0 * bf * sf * lf * hf * hf * (1.0 + sf / (6.0 * hf) + vf / (16.0 * lf * hf));
        assert!(close(hfu, narayanan, 1e-12), "{hfu} vs {narayanan}");
    }
}

#[test]
fn six_n_convention_is_six_params_plus_attention() {
    let m = preset("llama3-8b").unwrap();
    let f = m.model_flops_per_token(8192, FlopsConvention::SixN);
    let expect = 6.0 * m.params() as f64 + 12.0 * 32.0 * 4096.0 * 8192.0;
    assert!(close(f, expect, 1e-12));
}

#[test]
fn activation_memory_matches_korthikanti_table_2() {
    // GPT-3 175B's layer: s = 2048, h = 12288, a = 96, micro-batch 1, t = 8.
    let m = gpt("gpt3", 96, 12288, 96, 51200);
    let (s, b, h, a) = (2048.0, 1.0, 12288.0, 96.0);
    let sbh = s * b * h;
    for t in [1.0, 2.0, 8.0] {
        let act = |sp, r| layer_activation_bytes(&m, false, s, b, t, sp, r, false);
        let none = if t == 1.0 {
            sbh * (34.0 + 5.0 * a * s / h)
        } else {
            sbh * (10.0 + 24.0 / t + 5.0 * a * s / (h * t))
        };
        assert!(close(act(false, Recompute::None), none, 1e-12), "t={t}");
        assert!(
            close(act(true, Recompute::None), sbh * (34.0 / t + 5.0 * a * s / (h * t)), 1e-12),
            "t={t} sp"
        );
        assert!(close(act(true, Recompute::Selective), sbh * 34.0 / t, 1e-12), "t={t} selective");
        assert!(close(act(false, Recompute::Full), 2.0 * sbh, 1e-12), "t={t} full");
        assert!(close(act(true, Recompute::Full), 2.0 * sbh / t, 1e-12), "t={t} full sp");
    }
    // No parallelism: sbh(34 + 5as/h), 2 bytes per value.
    let one = layer_activation_bytes(&m, false, s, b, 1.0, false, Recompute::None, false);
    assert!(close(one, sbh * (34.0 + 5.0 * a * s / h), 1e-12));
}

fn hf(name: &str) -> plan::Model {
    let path = format!("{}/tests/data/{name}.json", env!("CARGO_MANIFEST_DIR"));
    from_hf_config(name, &std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn hugging_face_configs_parse_into_the_right_shapes() {
    // (file, layers, hidden, heads, kv heads, ffn, vocab, experts, top-k, params in billions)
    let cases = [
        ("llama3-8b", 32, 4096, 32, 8, 14336, 128256, 0, 0, 8.03),
        ("llama3-70b", 80, 8192, 64, 8, 28672, 128256, 0, 0, 70.55),
        ("llama3-405b", 126, 16384, 128, 8, 53248, 128256, 0, 0, 405.85),
        ("mixtral-8x7b", 32, 4096, 32, 8, 14336, 32000, 8, 2, 46.70),
    ];
    for (file, l, h, a, kv, f, v, e, k, billions) in cases {
        let m = hf(file);
        assert_eq!((m.layers, m.hidden, m.heads, m.kv_heads, m.ffn, m.vocab), (l, h, a, kv, f, v), "{file}");
        assert!(m.gated_mlp && !m.tied_embeddings && !m.dropout, "{file}");
        let moe = m.moe.as_ref().map_or((0, 0), |x| (x.experts, x.top_k));
        assert_eq!(moe, (e, k), "{file}");
        let got = m.params() as f64 / 1e9;
        assert!((got - billions).abs() < 0.05, "{file}: {got:.3}B params, expected {billions}B");
        // The presets agree with the configs.
        assert_eq!(preset(file).unwrap().params(), m.params(), "{file} preset");
    }
    // Mixtral: 12.9B active of 46.7B.
    let mix = hf("mixtral-8x7b");
    assert!((mix.active_params() as f64 / 1e9 - 12.88).abs() < 0.05);
    // GPT-2 small: learned positions, biases, tied: exactly 124,439,808 parameters.
    let g = hf("gpt2");
    assert_eq!(g.params(), 124_439_808);
    assert!(g.dropout && g.tied_embeddings && !g.gated_mlp);
}

#[test]
fn a_config_missing_a_field_names_it() {
    let text =
        std::fs::read_to_string(format!("{}/tests/data/llama3-8b.json", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let broken = text.replace("\"hidden_size\": 4096,", "");
    let e = from_hf_config("config.json", &broken).unwrap_err();
    assert_eq!(e, PlanError::MissingField { source: "config.json".into(), field: "hidden_size".into() });
    assert!(e.to_string().contains("missing field `hidden_size`"), "{e}");
    let e = from_toml("m.toml", "layers = 2\nhidden = 64\nheads = 4\n").unwrap_err();
    assert!(e.to_string().contains("`vocab`"), "{e}");
    let e = from_toml("m.toml", "layers = 2\nhidden = 64\nheads = 4\nvocab = 10\nwidth = 3\n").unwrap_err();
    assert!(e.to_string().contains("width"), "{e}");
}

#[test]
fn a_toml_model_spec_reads_moe_fields() {
    let m = from_toml(
        "m.toml",
        "name = \"tiny-moe\"\nlayers = 4\nhidden = 256\nheads = 8\nkv_heads = 2\nffn = 512\nvocab = 1000\n\
         gated_mlp = true\nexperts = 16\ntop_k = 2\nexpert_ffn = 128\nshared_experts = 1\ndense_layers = 1\n",
    )
    .unwrap();
    let moe = m.moe.clone().unwrap();
    assert_eq!(
        (moe.experts, moe.top_k, moe.expert_ffn, moe.shared_experts, moe.dense_layers),
        (16, 2, 128, 1, 1)
    );
    assert!(m.active_params() < m.params());
}

fn job(model: &str, gpus: u64, seq: u64, batch_tokens: u64) -> Job {
    Job {
        model: preset(model).unwrap(),
        seq,
        global_batch_seqs: batch_tokens / seq,
        gpus,
        precision: Precision::Bf16,
        convention: FlopsConvention::SixN,
    }
}

#[test]
fn a_layout_that_does_not_divide_names_the_constraint() {
    let hw = lookup("H100-SXM5-80GB").unwrap();
    let sw = Software::default();
    let j = job("llama3-70b", 64, 8192, 1 << 22);
    let ok = Layout {
        tp: 8,
        pp: 4,
        vp: 1,
        dp: 2,
        cp: 1,
        ep: 1,
        micro_batch: 1,
        zero: 1,
        recompute: Recompute::None,
        sp: true,
    };
    ok.check(&j, &hw, &sw).unwrap();
    // (layout, GPUs in the job, the constraint it breaks)
    let cases = [
        (Layout { tp: 3, ..ok }, 24, "heads % tp == 0"),
        (Layout { dp: 4, ..ok }, 64, "tp * pp * dp * cp == gpus"),
        (Layout { tp: 16, pp: 2, ..ok }, 64, "tp <= GPUs per scale-up domain"),
        (Layout { vp: 30, ..ok }, 64, "pp * vp <= layers"),
        (Layout { ep: 2, ..ok }, 64, "ep == 1 for a dense model"),
        (Layout { cp: 2, dp: 1, ..ok }, 64, "seq % (2 * cp) == 0"),
    ];
    for (l, gpus, constraint) in cases {
        let seq = if constraint.starts_with("seq") { 8190 } else { 8192 };
        let j = Job { seq, gpus, ..j.clone() };
        match l.check(&j, &hw, &sw) {
            Err(PlanError::Layout { constraint: c, .. }) => assert_eq!(c, constraint, "{l:?}"),
            other => panic!("{l:?}: expected {constraint}, got {other:?}"),
        }
    }
    let strict = Software { uneven_pipeline: false, ..sw };
    let uneven = Layout { pp: 3, tp: 8, dp: 1, ..ok };
    let j3 = Job { gpus: 24, ..j.clone() };
    let e = uneven.check(&j3, &hw, &strict).unwrap_err();
    assert!(e.to_string().contains("layers % (pp * vp) == 0"), "{e}");
}

#[test]
fn a_gpu_count_no_layout_can_use_names_why() {
    let hw = lookup("H100-SXM5-80GB").unwrap();
    // 405B cannot fit on 4 GPUs whatever the layout.
    let e = search(&job("llama3-405b", 4, 8192, 1 << 22), &hw, &Software::default(), 3).unwrap_err();
    assert!(matches!(e, PlanError::NoLayout { gpus: 4, .. }), "{e:?}");
    assert!(e.to_string().contains("memory per GPU"), "{e}");
    let e = search(&job("llama3-8b", 0, 8192, 1 << 22), &hw, &Software::default(), 3).unwrap_err();
    assert!(e.to_string().contains("gpus >= 1"), "{e}");
}

#[test]
fn search_finds_a_fitting_layout_for_405b_on_10000_h100s() {
    let hw = lookup("H100-SXM5-80GB").unwrap();
    let j = job("llama3-405b", 10_000, 8192, 16 << 20);
    let best = search(&j, &hw, &Software::default(), 5).unwrap();
    assert!(!best.is_empty());
    for p in &best {
        assert!(p.fits && p.memory_gib <= 80.0, "{p:?}");
        assert_eq!(p.layout.gpus(), 10_000);
        assert!(p.mfu > 0.2 && p.mfu < 0.8, "MFU {}", p.mfu);
    }
    assert!(best.windows(2).all(|w| w[0].mfu >= w[1].mfu), "sorted best first");
}

#[test]
fn search_handles_moe_with_expert_parallelism() {
    let hw = lookup("H100-SXM5-80GB").unwrap();
    let best = search(&job("mixtral-8x7b", 64, 4096, 1 << 22), &hw, &Software::default(), 3).unwrap();
    assert!(best[0].fits);
    let best = search(&job("deepseek-v3", 2048, 4096, 15 << 20), &hw, &Software::default(), 3).unwrap();
    assert!(best[0].fits && best[0].layout.ep > 1, "{:?}", best[0].layout);
}

#[test]
fn published_runs_are_predicted_within_3_points_on_average() {
    let r = validate("published_runs.csv", PUBLISHED_RUNS_CSV, false).unwrap();
    for v in &r.runs {
        println!(
            "{:>3} {:<30} {} published {:.1} predicted {:.1}",
            v.row, v.model, v.metric, v.published_pct, v.predicted_pct
        );
    }
    for k in &r.skipped {
        println!("{:>3} {:<30} skipped: {}", k.row, k.model, k.reason);
    }
    println!(
        "MAE {:.2} in-sample, {:.2} leave-one-source-out, over {} runs; {} skipped",
        r.mae_pts,
        r.held_out_mae_pts,
        r.runs.len(),
        r.skipped.len()
    );
    assert_eq!(r.runs.len() + r.skipped.len(), 47, "every data row is validated or skipped");
    assert!(r.runs.len() >= 31, "validated {}", r.runs.len());
    assert!(r.mae_pts <= 3.0, "in-sample MAE {:.2} points", r.mae_pts);
    // Out of sample: each source predicted with the calibration the other sources give.
    assert!(r.sources >= 8, "{} sources", r.sources);
    assert!(r.held_out_mae_pts <= 3.0, "leave-one-source-out MAE {:.2} points", r.held_out_mae_pts);
    // A row is skipped only for what no documented rule can fill: the figure to predict, the
    // layout, the GPU count, or a GPU the table lacks.
    let unfillable =
        ["no MFU or HFU published", "tensor/pipeline split not given", "gpu_count not given", "unknown GPU"];
    for k in &r.skipped {
        assert!(
            unfillable.iter().any(|u| k.reason.starts_with(u)),
            "row {} {} skipped: {}",
            k.row,
            k.model,
            k.reason
        );
    }
}

#[test]
fn llama_3_405b_on_its_published_16k_gpu_layout_fits_and_is_predicted() {
    let r = validate("published_runs.csv", PUBLISHED_RUNS_CSV, false).unwrap();
    let runs: Vec<_> = r.runs.iter().filter(|v| v.model == "Llama 3 405B" && v.gpus == 16_384).collect();
    assert_eq!(runs.len(), 2, "the 8k- and 128k-token runs on 16,384 GPUs");
    for v in runs {
        let l = &v.prediction.layout;
        println!(
            "Llama 3 405B, 16,384 H100s, tp {} cp {} pp {} vp {} dp {}: {:.1} GiB per GPU, MFU {:.1}% (published {:.1}%)",
            l.tp, l.cp, l.pp, l.vp, l.dp, v.prediction.memory_gib, v.predicted_pct, v.published_pct
        );
        assert_eq!((l.tp, l.pp), (8, 16));
        assert!(v.prediction.fits && v.prediction.memory_gib <= 80.0, "{:.1} GiB", v.prediction.memory_gib);
        assert!(v.error_pts.abs() <= 5.0, "predicted {:.1} against {:.1}", v.predicted_pct, v.published_pct);
    }
}

#[test]
fn model_names_match_presets_by_family_and_size() {
    use plan::validate::preset_for;
    for (name, preset) in [
        ("Llama 3 405B", "llama3-405b"),
        ("LLAMA3.1 405B", "llama3-405b"),
        ("Llama-3-8B", "llama3-8b"),
        ("LLAMA3 70B", "llama3-70b"),
        ("Llama 2 70B", "llama2-70b"),
        ("Llama 2 7B arch (LlamaT)", "llama2-7b"),
        ("GPT-3 175B", "gpt3-175b"),
        ("GPT3 175B", "gpt3-175b"),
        ("Mixtral 8x7B", "mixtral-8x7b"),
        ("DeepSeek-V3 (w/o MTP)", "deepseek-v3"),
        ("Qwen2.5 72B", "qwen2.5-72b"),
        ("PaLM 540B", "palm-540b"),
        ("MPT 30B", "mpt-30b"),
        ("MT-NLG 530B", "mt-nlg-530b"),
    ] {
        assert_eq!(preset_for(name).map(|m| m.name), Some(preset.to_string()), "{name}");
    }
    for name in
        ["GPT 1.7B", "Llama 3 13B", "GPT-3 177B (strong scaling)", "Gopher 280B", "GPT-OSS 120B (MoE)"]
    {
        assert!(preset_for(name).is_none(), "{name} has no preset");
    }
    assert_eq!(plan::validate::default_vocab("GPT 530B"), Some(51_200));
    assert_eq!(plan::validate::default_vocab("Gopher 280B"), None);
}

#[test]
fn the_built_in_calibration_is_the_fit_over_every_published_run() {
    let r = validate("published_runs.csv", PUBLISHED_RUNS_CSV, false).unwrap();
    for f in &r.calibration {
        let built_in = plan::hardware::calibration_for(&f.generation);
        assert_eq!(
            (built_in.gemm_eff, built_in.attn_eff),
            (f.gemm_eff, f.attn_eff),
            "{}: the constants in hardware.rs are not what validate fits",
            f.generation
        );
    }
    assert_eq!(r.calibration.len(), plan::hardware::FITTED_GENERATIONS.len());
}

#[test]
fn search_beats_or_matches_every_published_layout_and_fits() {
    let r = validate("published_runs.csv", PUBLISHED_RUNS_CSV, true).unwrap();
    for v in &r.runs {
        assert!(
            v.prediction.fits,
            "row {} {}: the published layout does not fit by our memory model",
            v.row, v.model
        );
        let best = v.best.as_ref().unwrap_or_else(|| panic!("row {}: no layout found", v.row));
        assert!(best.fits);
        assert!(
            v.best_mfu_pct >= v.published_layout_mfu_pct - 1e-9,
            "row {} {}: best {:.2} < published layout {:.2}",
            v.row,
            v.model,
            v.best_mfu_pct,
            v.published_layout_mfu_pct
        );
    }
}

#[test]
fn hardware_toml_overrides_and_defines() {
    let h = plan::hardware::from_toml(
        "hw.toml",
        "name = \"H100-SXM5-80GB\"\nnic_gbps_per_gpu = 200\n[calibration]\ngemm_eff = 0.6\n",
    )
    .unwrap();
    assert_eq!(h.nic_gbit, 200.0);
    assert_eq!(h.calibration.gemm_eff, 0.6);
    assert_eq!(h.bf16_tflops, 989.4);
    let e = plan::hardware::from_toml("hw.toml", "name = \"X1\"\nbf16_dense_tflops = 100\n").unwrap_err();
    assert!(e.to_string().contains("missing field `hbm_gb`"), "{e}");
    let e =
        plan::hardware::from_toml("hw.toml", "name = \"B200\"\n[calibration]\ngemm_eff = 1.5\n").unwrap_err();
    assert!(e.to_string().contains("calibration.gemm_eff"), "{e}");
    assert!(lookup("A100 80GB (Selene)").unwrap().name == "A100-SXM4-80GB");
    assert!(lookup("Z9000").unwrap_err().to_string().contains("unknown GPU"));
}

#[test]
fn deepseek_and_qwen_moe_config_fields_parse() {
    let ds = r#"{"model_type": "deepseek_v3", "num_hidden_layers": 61, "hidden_size": 7168,
        "num_attention_heads": 128, "num_key_value_heads": 128, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3, "vocab_size": 129280, "hidden_act": "silu"}"#;
    let m = from_hf_config("deepseek.json", ds).unwrap();
    let moe = m.moe.unwrap();
    assert_eq!(
        (moe.experts, moe.top_k, moe.expert_ffn, moe.shared_experts, moe.dense_layers),
        (256, 8, 2048, 1, 3)
    );
    let qwen = r#"{"model_type": "qwen2_moe", "num_hidden_layers": 24, "hidden_size": 2048,
        "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 5632,
        "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts": 60,
        "num_experts_per_tok": 4, "vocab_size": 151936}"#;
    let m = from_hf_config("qwen.json", qwen).unwrap();
    let moe = m.moe.unwrap();
    assert_eq!(
        (moe.experts, moe.top_k, moe.expert_ffn, moe.shared_experts, moe.shared_ffn),
        (60, 4, 1408, 1, 5632)
    );
    let e = from_hf_config("qwen.json", &qwen.replace("\"num_experts_per_tok\": 4,", "")).unwrap_err();
    assert!(e.to_string().contains("num_experts_per_tok"), "{e}");
}

#[test]
fn validation_reads_the_year_of_each_source() {
    use plan::validate::source_year;
    assert_eq!(source_year("Narayanan et al. SC21 (arXiv 2104.04473) Table 1; README Apr-2021"), Some(2021));
    assert_eq!(source_year("Chowdhery et al. PaLM (arXiv 2204.02311)"), Some(2022));
    assert_eq!(source_year("NVIDIA/Megatron-LM README (commit f2e5db402c, Jul-2024)"), Some(2024));
    assert_eq!(source_year("BigScience tr11-176B-ml README"), None);
}

#[test]
fn a_parallel_block_saves_a_tensor_parallel_all_reduce_and_a_norm() {
    let hw = plan::hardware::lookup("H100-SXM5-80GB").unwrap();
    let sequential = job("llama3-70b", 64, 4096, 1 << 20);
    let mut parallel = sequential.clone();
    parallel.model.parallel_block = true;
    let l = Layout {
        tp: 8,
        pp: 1,
        vp: 1,
        dp: 8,
        cp: 1,
        ep: 1,
        micro_batch: 1,
        zero: 1,
        recompute: Recompute::None,
        sp: true,
    };
    let sw = Software { tp_comm_overlap: false, ..Software::default() };
    let (a, b) = (predict(&sequential, &hw, &l, &sw), predict(&parallel, &hw, &l, &sw));
    // Same FLOPs, less exposed communication, less element-wise time and activation memory.
    assert!(b.stage_comm_s < 0.6 * a.stage_comm_s, "{} vs {}", b.stage_comm_s, a.stage_comm_s);
    assert!(b.stage_compute_s < a.stage_compute_s);
    assert!(b.memory.activations < a.memory.activations);
    assert!(b.mfu > a.mfu);
}
