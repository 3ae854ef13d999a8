//! Deciding which workers can run an action.
//!
//! An action's platform properties become [`Requirement`]s once, when it is queued,
//! according to the configured rule for each name; matching a worker is then a pass
//! over a handful of strings. A property name may appear several times on a worker
//! (it offers several values) and, for `exact`, any of them satisfies the action.
//! When nobody can run an action, [`explain`] names the property that rules every
//! worker out, because "no worker" alone sends the user hunting.

use cairn_proto::reapi::platform::Property;

use super::config::{PropertyRule, SchedulerConfig};
use crate::error::{Error, Result};

/// One thing a worker must offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// A property with exactly this value.
    Exact { name: String, value: String },
    /// A numeric property at least this large.
    Minimum { name: String, value: u64 },
}

impl Requirement {
    /// Whether a worker offering `offered` satisfies this requirement.
    pub fn satisfied_by(&self, offered: &[Property]) -> bool {
        match self {
            Requirement::Exact { name, value } => offered
                .iter()
                .any(|property| &property.name == name && &property.value == value),
            Requirement::Minimum { name, value } => offered.iter().any(|property| {
                &property.name == name
                    && property
                        .value
                        .trim()
                        .parse::<u64>()
                        .is_ok_and(|offer| offer >= *value)
            }),
        }
    }

    fn describe(&self) -> String {
        match self {
            Requirement::Exact { name, value } => format!("{name}={value} (exact)"),
            Requirement::Minimum { name, value } => format!("{name}>={value} (minimum)"),
        }
    }
}

/// What an action asks of its worker, and the properties passed on to it.
#[derive(Debug, Clone, Default)]
pub struct Requirements {
    /// Properties that must be matched.
    pub required: Vec<Requirement>,
    /// `priority` properties, handed to the worker unmatched.
    pub passed_through: Vec<Property>,
}

/// Sorts an action's platform properties by the configured rules. A `minimum`
/// property whose value is not a whole number is the client's mistake.
pub fn requirements(config: &SchedulerConfig, properties: &[Property]) -> Result<Requirements> {
    let mut requirements = Requirements::default();
    for property in properties {
        match config.rule(&property.name) {
            PropertyRule::Exact => requirements.required.push(Requirement::Exact {
                name: property.name.clone(),
                value: property.value.clone(),
            }),
            PropertyRule::Minimum => {
                let value = property.value.trim().parse::<u64>().map_err(|_| {
                    Error::invalid_argument(format!(
                        "platform property {}={} must be a whole number (its rule is minimum)",
                        property.name, property.value
                    ))
                })?;
                requirements.required.push(Requirement::Minimum {
                    name: property.name.clone(),
                    value,
                });
            }
            PropertyRule::Priority => requirements.passed_through.push(property.clone()),
            PropertyRule::Ignore => {}
        }
    }
    Ok(requirements)
}

/// Whether a worker offering `offered` can run an action requiring `required`.
pub fn matches(required: &[Requirement], offered: &[Property]) -> bool {
    required
        .iter()
        .all(|requirement| requirement.satisfied_by(offered))
}

/// Why none of the workers offering `workers` can run an action requiring
/// `required`.
pub fn explain<'a>(
    required: &[Requirement],
    workers: impl Iterator<Item = &'a [Property]> + Clone,
) -> String {
    if workers.clone().next().is_none() {
        return "no worker is connected".to_string();
    }
    for requirement in required {
        if !workers
            .clone()
            .any(|offered| requirement.satisfied_by(offered))
        {
            return format!(
                "no connected worker satisfies platform property {}",
                requirement.describe()
            );
        }
    }
    let all: Vec<String> = required.iter().map(Requirement::describe).collect();
    format!(
        "no single connected worker satisfies all of the platform properties {}",
        all.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn property(name: &str, value: &str) -> Property {
        Property {
            name: name.to_string(),
            value: value.to_string(),
        }
    }

    fn config() -> SchedulerConfig {
        crate::exec_common::parse_json5(
            "{ platform_properties: { cpu_count: 'minimum', pool: 'priority', salt: 'ignore' } }",
        )
        .unwrap()
    }

    #[test]
    fn rules_sort_properties() {
        let requirements = requirements(
            &config(),
            &[
                property("cpu_arch", "x86_64"),
                property("cpu_count", "4"),
                property("pool", "fast"),
                property("salt", "1"),
            ],
        )
        .unwrap();
        assert_eq!(
            requirements.required,
            vec![
                Requirement::Exact {
                    name: "cpu_arch".into(),
                    value: "x86_64".into()
                },
                Requirement::Minimum {
                    name: "cpu_count".into(),
                    value: 4
                },
            ]
        );
        assert_eq!(requirements.passed_through, vec![property("pool", "fast")]);
    }

    #[test]
    fn minimum_needs_a_number() {
        let error = requirements(&config(), &[property("cpu_count", "many")]).unwrap_err();
        assert_eq!(error.kind(), crate::ErrorKind::InvalidArgument);
        assert!(error.message().contains("cpu_count"));
    }

    #[test]
    fn matching() {
        let wanted = requirements(
            &config(),
            &[property("cpu_arch", "x86_64"), property("cpu_count", "4")],
        )
        .unwrap()
        .required;
        let small = [property("cpu_arch", "x86_64"), property("cpu_count", "2")];
        let big = [property("cpu_arch", "x86_64"), property("cpu_count", "8")];
        let arm = [property("cpu_arch", "aarch64"), property("cpu_count", "64")];
        let multi = [
            property("cpu_arch", "aarch64"),
            property("cpu_arch", "x86_64"),
            property("cpu_count", "4"),
        ];
        assert!(!matches(&wanted, &small));
        assert!(matches(&wanted, &big));
        assert!(!matches(&wanted, &arm));
        assert!(matches(&wanted, &multi));
        assert!(matches(&[], &small));
        assert!(!matches(&wanted, &[property("cpu_arch", "x86_64")]));
    }

    #[test]
    fn explanations_name_the_property() {
        let wanted = requirements(
            &config(),
            &[property("cpu_arch", "x86_64"), property("cpu_count", "16")],
        )
        .unwrap()
        .required;
        let small = vec![property("cpu_arch", "x86_64"), property("cpu_count", "2")];
        let arm = vec![property("cpu_arch", "aarch64"), property("cpu_count", "64")];
        let none: Vec<Vec<Property>> = Vec::new();
        assert_eq!(
            explain(&wanted, none.iter().map(Vec::as_slice)),
            "no worker is connected"
        );
        let only_small = [small.clone()];
        let message = explain(&wanted, only_small.iter().map(Vec::as_slice));
        assert!(message.contains("cpu_count>=16"), "{message}");
        let both = [small, arm];
        let message = explain(&wanted, both.iter().map(Vec::as_slice));
        assert!(message.contains("no single connected worker"), "{message}");
    }
}
