//! Reading Kubernetes objects from YAML files.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use planproxy_crds::ProxyPolicy;
use serde::de::DeserializeOwned;

/// Why the input could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A YAML document does not parse.
    #[error("{path}: document {document}: invalid YAML: {source}")]
    Yaml {
        /// The file.
        path: PathBuf,
        /// The document's position in the file, from 1.
        document: usize,
        /// The parser's error.
        source: serde_yaml::Error,
    },
    /// A document parses as YAML but not as the object its kind says.
    #[error("{path}: document {document}: {kind} {name}: {source}")]
    Object {
        /// The file.
        path: PathBuf,
        /// The document's position in the file, from 1.
        document: usize,
        /// The object's kind.
        kind: String,
        /// The object's name.
        name: String,
        /// What does not fit the kind's schema (the message names the field).
        source: serde_json::Error,
    },
    /// `--from` names no YAML file.
    #[error("{0}: no *.yaml or *.yml file found")]
    Empty(PathBuf),
}

/// The objects read, plus documents of kinds the resolver does not read.
#[derive(Debug, Default)]
pub struct Objects {
    /// Services.
    pub services: Vec<Service>,
    /// EndpointSlices.
    pub endpoint_slices: Vec<EndpointSlice>,
    /// Nodes.
    pub nodes: Vec<Node>,
    /// ProxyPolicies.
    pub policies: Vec<ProxyPolicy>,
    /// `<file>: <apiVersion> <kind> <name>` of each document that was skipped.
    pub skipped: Vec<String>,
}

/// Reads every object of a file, or of every `*.yaml`/`*.yml` file under a
/// directory (recursively, in path order).
pub fn load(from: &Path) -> Result<Objects, LoadError> {
    let mut files = Vec::new();
    collect_files(from, &mut files)?;
    if files.is_empty() {
        return Err(LoadError::Empty(from.to_owned()));
    }
    files.sort();
    let mut objects = Objects::default();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| LoadError::Read {
            path: file.clone(),
            source,
        })?;
        read_documents(&file, &text, &mut objects)?;
    }
    Ok(objects)
}

fn collect_files(path: &Path, files: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let read_error = |source| LoadError::Read {
        path: path.to_owned(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(read_error)?;
    if metadata.is_file() {
        files.push(path.to_owned());
        return Ok(());
    }
    for entry in std::fs::read_dir(path).map_err(read_error)? {
        let entry_path = entry.map_err(read_error)?.path();
        if entry_path.is_dir() {
            collect_files(&entry_path, files)?;
        } else if entry_path
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml")
        {
            files.push(entry_path);
        }
    }
    Ok(())
}

fn read_documents(path: &Path, text: &str, objects: &mut Objects) -> Result<(), LoadError> {
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value: serde_json::Value =
            serde::Deserialize::deserialize(document).map_err(|source| LoadError::Yaml {
                path: path.to_owned(),
                document: i + 1,
                source,
            })?;
        add_value(path, i + 1, value, objects)?;
    }
    Ok(())
}

fn add_value(
    path: &Path,
    document: usize,
    value: serde_json::Value,
    objects: &mut Objects,
) -> Result<(), LoadError> {
    if value.is_null() {
        return Ok(());
    }
    let field = |name: &str| {
        value
            .get(name)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let api_version = field("apiVersion");
    let kind = field("kind");
    let name = value
        .pointer("/metadata/name")
        .and_then(|v| v.as_str())
        .unwrap_or("<unnamed>")
        .to_owned();
    fn parse<T: DeserializeOwned>(
        value: serde_json::Value,
        path: &Path,
        document: usize,
        kind: &str,
        name: &str,
    ) -> Result<T, LoadError> {
        serde_json::from_value(value).map_err(|source| LoadError::Object {
            path: path.to_owned(),
            document,
            kind: kind.to_owned(),
            name: name.to_owned(),
            source,
        })
    }
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => objects
            .services
            .push(parse(value, path, document, &kind, &name)?),
        ("discovery.k8s.io/v1", "EndpointSlice") => objects
            .endpoint_slices
            .push(parse(value, path, document, &kind, &name)?),
        ("v1", "Node") => objects
            .nodes
            .push(parse(value, path, document, &kind, &name)?),
        ("planproxy.dev/v1alpha1", "ProxyPolicy") => objects
            .policies
            .push(parse(value, path, document, &kind, &name)?),
        ("v1", "List") => {
            let items = match value.get("items") {
                Some(serde_json::Value::Array(items)) => items.clone(),
                _ => Vec::new(),
            };
            for item in items {
                add_value(path, document, item, objects)?;
            }
        }
        _ => objects
            .skipped
            .push(format!("{}: {api_version} {kind} {name}", path.display())),
    }
    Ok(())
}
