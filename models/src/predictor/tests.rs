use tch::{Device, Kind, Tensor, nn};

use super::*;

fn snapshot() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    crate::features::write_random_snapshot(dir.path(), 3).unwrap();
    dir
}

fn images(b: i64, side: i64) -> Tensor {
    Tensor::rand([b, 1, side, side], (Kind::Float, Device::Cpu)) * 2.0 - 1.0
}

fn trainable(vs: &nn::VarStore) -> u64 {
    vs.trainable_variables()
        .iter()
        .map(|t| t.numel() as u64)
        .sum()
}

#[test]
fn every_variant_predicts_every_task_and_counts_its_parameters() {
    let dir = snapshot();
    let width: i64 = tasks().iter().map(Task::outputs).sum();
    assert_eq!(width, 14 * 2 + 3 + 2 + 3 + 7 + 1);
    for variant in [
        Variant::Linear,
        Variant::Mlp,
        Variant::AttentionPool,
        Variant::Resnet,
    ] {
        let mut cfg = PredictorConfig::new(variant, Some(dir.path().to_path_buf()), 32);
        cfg.layers = vec![1, 2];
        cfg.hidden = 16;
        if variant == Variant::Resnet {
            cfg.backbone = None;
            cfg.resnet_input = 32;
            cfg.resnet_blocks = [1, 1, 1, 1];
            cfg.resnet_width = 4;
        }
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Predictor::new(&vs.root(), &cfg).unwrap();
        assert_eq!(trainable(&vs), cfg.parameters().unwrap(), "{variant:?}");
        let keys = crate::unet::dropout::keys(0, 0, &[0, 1, 2]);
        let p = net.predict(&images(3, 32), Some(&keys)).unwrap();
        assert_eq!(p.outputs.size(), [3, width], "{variant:?}");
        assert_eq!(p.embeddings.is_some(), variant == Variant::AttentionPool);
        if let Some(e) = p.embeddings {
            assert_eq!(e.size(), [3, tasks().len() as i64, 128]);
        }
        // A wrong side is an error naming the expected shape.
        let err = net.predict(&images(1, 16), None).err().unwrap().to_string();
        assert!(err.contains("[batch, 1, 32, 32]"), "{err}");
    }
}

#[test]
fn attention_pooling_beyond_the_backbone_depth_is_an_error_naming_the_field() {
    let dir = snapshot();
    let mut cfg = PredictorConfig::new(Variant::AttentionPool, Some(dir.path().to_path_buf()), 32);
    cfg.layers = vec![3];
    let vs = nn::VarStore::new(Device::Cpu);
    let err = Predictor::new(&vs.root(), &cfg).err().unwrap().to_string();
    assert!(
        err.contains("model.predictor.layers") && err.contains("2 layers"),
        "{err}"
    );
    let no_backbone = PredictorConfig::new(Variant::Linear, None, 32);
    let err = no_backbone.validate().unwrap_err().to_string();
    assert!(err.contains("model.predictor.backbone"), "{err}");
}

#[test]
fn the_loss_sums_present_tasks_and_skips_missing_ones() {
    let width: i64 = tasks().iter().map(Task::outputs).sum();
    let outputs = Tensor::randn([2, width], (Kind::Float, Device::Cpu));
    let mut labels = vec![0i64; 36];
    labels[0] = 2; // row 0: atelectasis positive
    labels[15] = 1; // row 0: sex male
    labels[18 + 16] = 3; // row 1: view lateral
    let labels = Tensor::from_slice(&labels).view([2, 18]);
    let age = Tensor::from_slice(&[f32::NAN, 0.5]);
    let got = per_sample_loss(&outputs, &labels, &age).unwrap();
    let o = Vec::<f32>::try_from(outputs.flatten(0, -1)).unwrap();
    let ce = |row: usize, at: usize, k: usize, class: usize| {
        let s = &o[row * width as usize + at..][..k];
        let lse = s.iter().map(|v| v.exp()).sum::<f32>().ln();
        lse - s[class]
    };
    // Offsets: findings 0..28, race 28..31, sex 31..33, view 33..36, dataset 36..43, age 43.
    let row0 = ce(0, 0, 2, 1) + ce(0, 31, 2, 0);
    let row1 = ce(1, 33, 3, 2) + (o[width as usize + 43] - 0.5).powi(2);
    let got = Vec::<f32>::try_from(got).unwrap();
    assert!(
        (got[0] - row0).abs() < 1e-5 && (got[1] - row1).abs() < 1e-5,
        "{got:?} vs {row0} {row1}"
    );
}

#[test]
fn a_torchvision_resnet_file_loads_strictly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("resnet.safetensors");
    resnet::write_random(&file, [1, 1, 1, 1], 4, 5).unwrap();
    let mut cfg = PredictorConfig::new(Variant::Resnet, Some(file.clone()), 32);
    cfg.resnet_blocks = [1, 1, 1, 1];
    cfg.resnet_width = 4;
    cfg.resnet_input = 32;
    let vs = nn::VarStore::new(Device::Cpu);
    Predictor::new(&vs.root(), &cfg).unwrap();
    let loaded = vs.variables();
    let file_tensors = crate::model::read_weights(&file).unwrap().tensors;
    let w = &file_tensors["layer2.0.conv2.weight"];
    assert!(loaded["backbone.layer2.0.conv2.weight"].equal(w));
    // Another shape names what is missing.
    cfg.resnet_blocks = [1, 2, 1, 1];
    let vs = nn::VarStore::new(Device::Cpu);
    let err = Predictor::new(&vs.root(), &cfg).err().unwrap().to_string();
    assert!(
        err.contains("layer2.1.") && err.contains("resnet.safetensors"),
        "{err}"
    );
}
