//! Typed access to a NodeProto's attributes, with the op's defaults.

use super::proto::{attribute_proto::AttributeType, AttributeProto, NodeProto};
use super::tensor::tensor_from_proto;
use crate::ir::Tensor;

pub struct Attrs<'a> {
    node: &'a NodeProto,
}

impl<'a> Attrs<'a> {
    pub fn new(node: &'a NodeProto) -> Attrs<'a> {
        Attrs { node }
    }

    pub fn get(&self, name: &str) -> Option<&'a AttributeProto> {
        self.node.attribute.iter().find(|a| a.name.as_deref() == Some(name))
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    fn kind(a: &AttributeProto) -> Option<AttributeType> {
        a.r#type.and_then(|t| AttributeType::try_from(t).ok())
    }

    pub fn int(&self, name: &str, default: i64) -> Result<i64, String> {
        match self.get(name) {
            None => Ok(default),
            Some(a) => a.i.ok_or_else(|| format!("attribute '{name}' must be an int")),
        }
    }

    pub fn opt_int(&self, name: &str) -> Result<Option<i64>, String> {
        self.get(name).map(|_| self.int(name, 0)).transpose()
    }

    pub fn bool(&self, name: &str, default: bool) -> Result<bool, String> {
        Ok(self.int(name, default as i64)? != 0)
    }

    pub fn float(&self, name: &str, default: f32) -> Result<f32, String> {
        match self.get(name) {
            None => Ok(default),
            Some(a) => a.f.ok_or_else(|| format!("attribute '{name}' must be a float")),
        }
    }

    pub fn ints(&self, name: &str) -> Result<Option<Vec<i64>>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(a) if a.ints.is_empty() && Self::kind(a) != Some(AttributeType::Ints) => {
                Err(format!("attribute '{name}' must be a list of ints"))
            }
            Some(a) => Ok(Some(a.ints.clone())),
        }
    }

    pub fn string(&self, name: &str, default: &str) -> Result<String, String> {
        match self.get(name) {
            None => Ok(default.to_string()),
            Some(a) => {
                a.s.as_ref()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .ok_or_else(|| format!("attribute '{name}' must be a string"))
            }
        }
    }

    pub fn tensor(&self, name: &str) -> Result<Option<Tensor>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(a) => {
                let t = a.t.as_ref().ok_or_else(|| format!("attribute '{name}' must be a tensor"))?;
                tensor_from_proto(t, None).map(Some)
            }
        }
    }

    /// Attributes that reference a function's attribute cannot be resolved in a plain graph.
    pub fn check_no_refs(&self) -> Result<(), String> {
        match self.node.attribute.iter().find(|a| a.ref_attr_name.is_some()) {
            Some(a) => Err(format!("attribute '{}' refers to a function attribute", a.name.as_deref().unwrap_or(""))),
            None => Ok(()),
        }
    }
}
