//! Models as safetensors files a PyTorch user can load: PyTorch parameter names,
//! f32 little-endian tensors, and the preprocessing in the file's metadata.

use crate::data;
use crate::train::{Model, ModelSpec, TrainError};
use p2pml_proto::{DatasetKind, ModelKind, Normalization};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid safetensors file: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Model { path: PathBuf, source: TrainError },
}

/// What the metadata of an exported model says about its input.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportMeta {
    pub model: ModelKind,
    pub dataset: DatasetKind,
    pub normalization: Normalization,
    pub input_shape: [usize; 3],
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub classes: Vec<String>,
}

impl ExportMeta {
    pub fn new(model: ModelKind, dataset: DatasetKind, normalization: Normalization) -> Self {
        let i = data::info(dataset);
        ExportMeta { model, dataset, normalization, input_shape: i.shape, mean: i.mean, std: i.std, classes: i.classes }
    }

    fn to_map(&self) -> HashMap<String, String> {
        let json = |v: &dyn erased::Json| v.json();
        HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("producer".to_string(), format!("p2pml {}", env!("CARGO_PKG_VERSION"))),
            ("model".to_string(), self.model.to_string()),
            ("dataset".to_string(), self.dataset.to_string()),
            ("normalization".to_string(), self.normalization.to_string()),
            ("input_shape".to_string(), json(&self.input_shape.to_vec())),
            ("mean".to_string(), json(&self.mean)),
            ("std".to_string(), json(&self.std)),
            ("classes".to_string(), json(&self.classes)),
        ])
    }

    fn from_map(path: &Path, m: &HashMap<String, String>) -> Result<Self, ExportError> {
        let invalid = |msg: String| ExportError::Invalid { path: path.to_path_buf(), msg };
        let get = |k: &str| m.get(k).ok_or_else(|| invalid(format!("metadata has no '{k}'")));
        let parse_json = |k: &str| -> Result<serde_json::Value, ExportError> {
            serde_json::from_str(get(k)?).map_err(|e| invalid(format!("metadata '{k}': {e}")))
        };
        let floats = |k: &str| -> Result<Vec<f32>, ExportError> {
            serde_json::from_value(parse_json(k)?).map_err(|e| invalid(format!("metadata '{k}': {e}")))
        };
        let shape: Vec<usize> = serde_json::from_value(parse_json("input_shape")?).map_err(|e| invalid(format!("input_shape: {e}")))?;
        let input_shape: [usize; 3] = shape.try_into().map_err(|_| invalid("input_shape must have 3 entries".into()))?;
        Ok(ExportMeta {
            model: get("model")?.parse().map_err(|e| invalid(format!("{e}")))?,
            dataset: get("dataset")?.parse().map_err(|e| invalid(format!("{e}")))?,
            normalization: get("normalization")?.parse().map_err(|e| invalid(format!("{e}")))?,
            input_shape,
            mean: floats("mean")?,
            std: floats("std")?,
            classes: serde_json::from_value(parse_json("classes")?).map_err(|e| invalid(format!("classes: {e}")))?,
        })
    }
}

mod erased {
    pub(super) trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).expect("plain data serializes")
        }
    }
}

/// Writes every parameter and buffer of `model` to `path` as safetensors.
pub fn save(model: &Model, meta: &ExportMeta, path: &Path) -> Result<(), ExportError> {
    let tensors = model.named_tensors();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
            let values = Vec::<f32>::try_from(&t.reshape([-1])).expect("f32 tensor");
            let shape = t.size().iter().map(|&d| d as usize).collect();
            (name.clone(), shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())
        })
        .collect();
    let views = bytes.iter().map(|(n, s, b)| {
        (n.as_str(), TensorView::new(Dtype::F32, s.clone(), b).expect("sizes computed from the tensor"))
    });
    let data = safetensors::serialize(views, Some(meta.to_map())).map_err(|e| ExportError::Write {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    crate::fsio::write_atomic(path, &data).map_err(|source| ExportError::Write { path: path.to_path_buf(), source })
}

/// Reads a file written by [`save`]: its metadata and a model holding its values.
pub fn load(path: &Path, device: Device) -> Result<(ExportMeta, Model), ExportError> {
    let buf = std::fs::read(path).map_err(|source| ExportError::Read { path: path.to_path_buf(), source })?;
    let invalid = |msg: String| ExportError::Invalid { path: path.to_path_buf(), msg };
    let (_, header) = SafeTensors::read_metadata(&buf).map_err(|e| invalid(e.to_string()))?;
    let meta_map = header.metadata().clone().unwrap_or_default();
    let meta = ExportMeta::from_map(path, &meta_map)?;
    let st = SafeTensors::deserialize(&buf).map_err(|e| invalid(e.to_string()))?;
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(invalid(format!("{name} is {:?}, expected F32", view.dtype())));
        }
        let values: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        tensors.push((name, Tensor::from_slice(&values).view(shape.as_slice())));
    }
    let spec = ModelSpec { model: meta.model, shape: meta.input_shape, classes: meta.classes.len() };
    let wrap = |source| ExportError::Model { path: path.to_path_buf(), source };
    let mut model = Model::new(spec, device, 0).map_err(wrap)?;
    model.load_named(&tensors).map_err(wrap)?;
    Ok((meta, model))
}
