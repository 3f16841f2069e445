//! The constant store: weights and folded constants, keyed by `ConstId`.
//!
//! Bytes are `bytes::Bytes`, so a weight imported from a memory-mapped model or
//! external-data file is a slice of that map (no copy); constants made by passes
//! own their buffer.

use super::dtype::DType;
use super::op::ConstId;
use super::tensor::Tensor;
use bytes::Bytes;

#[derive(Clone, Debug)]
pub struct Constant {
    /// The ONNX initializer name, or a name a pass made up.
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Little-endian element data, exactly `numel * dtype.size()` bytes.
    pub bytes: Bytes,
}

impl Constant {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn to_tensor(&self) -> Tensor {
        Tensor::from_le_bytes(self.dtype, self.shape.clone(), &self.bytes)
            .expect("constant store entries are validated on insertion")
    }
}

#[derive(Clone, Debug, Default)]
pub struct ConstStore {
    items: Vec<Constant>,
}

impl ConstStore {
    /// Adds a constant after checking that its byte length matches its type and shape.
    pub fn insert(&mut self, c: Constant) -> Result<ConstId, String> {
        let want = c
            .shape
            .iter()
            .try_fold(c.dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("constant '{}' is too large", c.name))?;
        if c.bytes.len() != want {
            return Err(format!(
                "constant '{}' {}{:?} needs {want} bytes but has {}",
                c.name,
                c.dtype,
                c.shape,
                c.bytes.len()
            ));
        }
        self.items.push(c);
        Ok(self.items.len() - 1)
    }

    pub fn insert_tensor(&mut self, name: String, t: &Tensor) -> ConstId {
        self.insert(Constant { name, dtype: t.dtype(), shape: t.shape.clone(), bytes: Bytes::from(t.to_le_bytes()) })
            .expect("a tensor's own bytes always match its shape")
    }

    pub fn get(&self, id: ConstId) -> Option<&Constant> {
        self.items.get(id)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}
