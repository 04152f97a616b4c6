use super::*;
use std::io::Write;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A tiny IDX data set of `n` train and `m` test 28×28 images in `dir`.
fn write_idx_set(dir: &Path, n: usize, m: usize, gzip: bool) {
    for (prefix, count) in [("train", n), ("t10k", m)] {
        let images: Vec<u8> = (0..count * 784).map(|i| (i % 251) as u8).collect();
        let labels: Vec<u8> = (0..count).map(|i| (i % 10) as u8).collect();
        let img = encode_idx(&[count, 28, 28], &images);
        let lab = encode_idx(&[count], &labels);
        let (img, lab, ext) = if gzip { (gz(&img), gz(&lab), ".gz") } else { (img, lab, "") };
        write(dir, &format!("{prefix}-images-idx3-ubyte{ext}"), &img);
        write(dir, &format!("{prefix}-labels-idx1-ubyte{ext}"), &lab);
    }
}

#[test]
fn idx_reads_plain_and_gzipped_files() {
    for gzip in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        write_idx_set(dir.path(), 20, 7, gzip);
        let d = load(DatasetKind::FashionMnist, Some(dir.path())).unwrap();
        assert_eq!(d.train.len(), 20);
        assert_eq!(d.test.len(), 7);
        assert_eq!(d.train.shape, [1, 28, 28]);
        assert_eq!(d.train.images.len(), 20 * 784);
        assert_eq!(d.train.images[785], (785 % 251) as u8);
        assert_eq!(d.test.labels, vec![0, 1, 2, 3, 4, 5, 6]);
    }
}

fn err_string(dir: &Path) -> String {
    load(DatasetKind::Mnist, Some(dir)).unwrap_err().to_string()
}

#[test]
fn idx_truncated_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    write_idx_set(dir.path(), 5, 5, false);
    let full = encode_idx(&[5, 28, 28], &vec![0u8; 5 * 784]);
    write(dir.path(), "train-images-idx3-ubyte", &full[..full.len() - 100]);
    let e = err_string(dir.path());
    assert!(e.contains("train-images-idx3-ubyte") && e.contains("truncated"), "{e}");
    write(dir.path(), "train-images-idx3-ubyte", &full[..10]);
    assert!(err_string(dir.path()).contains("truncated header"));
    write(dir.path(), "train-images-idx3-ubyte", &full[..2]);
    assert!(err_string(dir.path()).contains("too short"));
}

#[test]
fn idx_wrong_magic_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    write_idx_set(dir.path(), 5, 5, false);
    let mut bad = encode_idx(&[5], &[0; 5]);
    bad[0] = 0x50;
    write(dir.path(), "train-labels-idx1-ubyte", &bad);
    let e = err_string(dir.path());
    assert!(e.contains("wrong magic number") && e.contains("train-labels"), "{e}");
    // An image file where labels belong: wrong number of dimensions.
    write(dir.path(), "train-labels-idx1-ubyte", &encode_idx(&[5, 28, 28], &vec![0; 5 * 784]));
    assert!(err_string(dir.path()).contains("3 dimensions where 1 were expected"));
    // A corrupt gzip stream.
    write(dir.path(), "train-labels-idx1-ubyte", &[0x1f, 0x8b, 1, 2, 3]);
    assert!(err_string(dir.path()).contains("corrupt gzip"));
}

#[test]
fn idx_count_mismatch_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    write_idx_set(dir.path(), 5, 5, false);
    write(dir.path(), "train-labels-idx1-ubyte", &encode_idx(&[4], &[0; 4]));
    let e = err_string(dir.path());
    assert!(e.contains("has 5 images but") && e.contains("has 4 labels"), "{e}");
}

#[test]
fn idx_bad_label_and_trailing_bytes() {
    let dir = tempfile::tempdir().unwrap();
    write_idx_set(dir.path(), 5, 5, false);
    write(dir.path(), "t10k-labels-idx1-ubyte", &encode_idx(&[5], &[0, 1, 2, 10, 3]));
    let e = err_string(dir.path());
    assert!(e.contains("label 10 at index 3") && e.contains("t10k-labels-idx1-ubyte"), "{e}");
    let mut long = encode_idx(&[5], &[0; 5]);
    long.push(0);
    write(dir.path(), "t10k-labels-idx1-ubyte", &long);
    assert!(err_string(dir.path()).contains("1 trailing bytes"));
}

#[test]
fn missing_dataset_names_the_package_or_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let e = load(DatasetKind::FashionMnist, Some(&dir.path().join("nope"))).unwrap_err().to_string();
    assert!(e.contains("dataset-fashion-mnist") && e.contains("--data-dir"), "{e}");
    let e = load(DatasetKind::FashionMnist, Some(dir.path())).unwrap_err().to_string();
    assert!(e.contains("train-images-idx3-ubyte[.gz]") && e.contains("dataset-fashion-mnist"), "{e}");
    assert!(!e.contains('\n'));
}

fn cifar_records(n: usize, label_of: impl Fn(usize) -> u8) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(label_of(i));
        out.extend((0..3072).map(|p| ((p + i) % 256) as u8));
    }
    out
}

#[test]
fn cifar_reads_batches_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&sub).unwrap();
    for b in 1..=5 {
        write(&sub, &format!("data_batch_{b}.bin"), &cifar_records(3, |i| ((i + b) % 10) as u8));
    }
    write(&sub, "test_batch.bin", &cifar_records(2, |_| 9));
    let d = load(DatasetKind::Cifar10, Some(dir.path())).unwrap();
    assert_eq!(d.train.len(), 15);
    assert_eq!(d.test.labels, vec![9, 9]);
    assert_eq!(d.train.shape, [3, 32, 32]);
    assert_eq!(d.train.labels[..3], [1, 2, 3]);
    assert_eq!(d.train.images[3072 + 5], 6); // record 1, pixel 5
}

#[test]
fn cifar_truncated_and_bad_labels_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    for b in 1..=5 {
        write(dir.path(), &format!("data_batch_{b}.bin"), &cifar_records(2, |_| 0));
    }
    let good = cifar_records(2, |_| 0);
    write(dir.path(), "test_batch.bin", &good[..good.len() - 1]);
    let e = load(DatasetKind::Cifar10, Some(dir.path())).unwrap_err().to_string();
    assert!(e.contains("test_batch.bin") && e.contains("not a whole number"), "{e}");
    write(dir.path(), "test_batch.bin", &cifar_records(2, |_| 11));
    let e = load(DatasetKind::Cifar10, Some(dir.path())).unwrap_err().to_string();
    assert!(e.contains("label 11"), "{e}");
    std::fs::remove_file(dir.path().join("data_batch_3.bin")).unwrap();
    let e = load(DatasetKind::Cifar10, Some(dir.path())).unwrap_err().to_string();
    assert!(e.contains("data_batch_3.bin"), "{e}");
}

#[test]
fn normalizations() {
    let split = Split { images: vec![0, 255, 51, 102], labels: vec![1], shape: [1, 2, 2] };
    let (x, y) = to_tensor(&split, DatasetKind::Mnist, Normalization::MinMax, Device::Cpu);
    assert_eq!(Vec::<f32>::try_from(&x.reshape([-1])).unwrap(), vec![0.0, 1.0, 0.2, 0.4]);
    assert_eq!(Vec::<i64>::try_from(&y).unwrap(), vec![1]);
    let (x, _) = to_tensor(&split, DatasetKind::Mnist, Normalization::MeanStd, Device::Cpu);
    let v = Vec::<f32>::try_from(&x.reshape([-1])).unwrap();
    assert!((v[1] - (1.0 - 0.1307) / 0.3081).abs() < 1e-5);
    let (x, _) = to_tensor(&split, DatasetKind::Mnist, Normalization::Standardize, Device::Cpu);
    let v = Vec::<f32>::try_from(&x.reshape([-1])).unwrap();
    let mean: f32 = v.iter().sum::<f32>() / 4.0;
    assert!(mean.abs() < 1e-5, "{v:?}");
}

#[test]
#[ignore = "needs the dataset-fashion-mnist package; run with --ignored"]
fn debian_fashion_mnist_loads() {
    let d = load(DatasetKind::FashionMnist, None).unwrap();
    assert_eq!((d.train.len(), d.test.len()), (60_000, 10_000));
}
