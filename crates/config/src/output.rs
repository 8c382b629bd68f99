//! Writing configuration back out.
use crate::ResourceSet;
pub fn config_dump_json(_set: &ResourceSet, _include_eds: bool) -> String { todo!() }
pub fn standalone_bootstrap_yaml(_set: &ResourceSet) -> String { todo!() }
