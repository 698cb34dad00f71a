//! The SCM's causal graph as data (scm.md): which variables are parents of which, read from a TOML file (the
//! paper's graph is built in), validated once (known variables, no self-loop or cycle, each bidirectional pair
//! used in exactly the direction it names) and put in topological order.

use std::collections::BTreeMap;
use std::path::Path;

use radit_sharding::schema::Vocabulary;
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// The paper's graph (Table 1; pneumothorax -> support devices).
pub const DEFAULT_GRAPH: &str = include_str!("default_graph.toml");

/// The name of the one continuous variable.
pub const AGE: &str = "age";

/// What a graph file holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphFile {
    /// Each variable's parents; absent variables are roots.
    #[serde(default)]
    pub parents: BTreeMap<String, Vec<String>>,
    /// Pairs drawn both ways by the clinicians, each with the direction this graph uses.
    #[serde(default)]
    pub bidirectional: Vec<Bidirectional>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bidirectional {
    pub between: [String; 2],
    /// Which of the two is the parent in this graph.
    pub parent: String,
}

/// A variable's kind: categorical with its real classes (the vocabulary's, class 0 "missing" excluded), or age.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// `label`: the column of the store's `labels`; `classes`: the names of classes 1..=K.
    Categorical { label: usize, classes: Vec<String> },
    /// Years / 100, as the store keeps it.
    Age,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variable {
    pub name: String,
    pub kind: Kind,
}

impl Variable {
    /// Real classes of a categorical (without "missing"); 1 for age.
    pub fn classes(&self) -> usize {
        match &self.kind {
            Kind::Categorical { classes, .. } => classes.len(),
            Kind::Age => 1,
        }
    }
}

/// A validated graph over the vocabulary's 19 variables (the 18 label columns in order, then age).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    pub variables: Vec<Variable>,
    /// Parents of each variable, by index, in the file's order.
    pub parents: Vec<Vec<usize>>,
    /// A topological order (parents first; ties by variable index).
    pub order: Vec<usize>,
    /// The file it was read from, for the model's metadata.
    pub source: GraphFile,
}

fn bad(what: &str, reason: String) -> ModelError {
    ModelError::BadInput {
        input: "scm graph",
        reason: format!("{what}: {reason}"),
    }
}

impl Graph {
    /// The paper's graph.
    pub fn default_graph() -> Self {
        Self::parse(DEFAULT_GRAPH, "the built-in graph").expect("the built-in graph is valid")
    }

    /// Reads and validates a graph file.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates graph text; `what` names it in errors.
    pub fn parse(text: &str, what: &str) -> Result<Self, ModelError> {
        let file: GraphFile = toml::from_str(text).map_err(|e| bad(what, e.to_string()))?;
        Self::from_file(file, what)
    }

    pub fn from_file(file: GraphFile, what: &str) -> Result<Self, ModelError> {
        let vocab = Vocabulary::current();
        let mut variables: Vec<Variable> = vocab
            .labels
            .iter()
            .enumerate()
            .map(|(label, name)| Variable {
                name: name.clone(),
                kind: Kind::Categorical {
                    label,
                    classes: vocab.classes[label][1..].to_vec(),
                },
            })
            .collect();
        variables.push(Variable {
            name: AGE.into(),
            kind: Kind::Age,
        });
        let index = |name: &str| -> Result<usize, ModelError> {
            variables
                .iter()
                .position(|v| v.name == name)
                .ok_or_else(|| {
                    bad(
                        what,
                        format!(
                            "unknown variable `{name}` (known: {})",
                            variables
                                .iter()
                                .map(|v| v.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })
        };
        let mut parents = vec![Vec::new(); variables.len()];
        for (child, ps) in &file.parents {
            let c = index(child)?;
            for p in ps {
                let p = index(p)?;
                if p == c {
                    return Err(bad(what, format!("`{child}` is its own parent")));
                }
                if parents[c].contains(&p) {
                    return Err(bad(
                        what,
                        format!("`{child}` lists `{}` twice", variables[p].name),
                    ));
                }
                parents[c].push(p);
            }
        }
        for b in &file.bidirectional {
            let [a, z] = [index(&b.between[0])?, index(&b.between[1])?];
            let parent = index(&b.parent)?;
            if parent != a && parent != z {
                return Err(bad(
                    what,
                    format!(
                        "bidirectional {:?}: parent `{}` is not one of the pair",
                        b.between, b.parent
                    ),
                ));
            }
            let child = if parent == a { z } else { a };
            if !parents[child].contains(&parent) || parents[parent].contains(&child) {
                return Err(bad(
                    what,
                    format!(
                        "bidirectional {:?}: the graph must have exactly `{} -> {}` (choose one direction)",
                        b.between, variables[parent].name, variables[child].name
                    ),
                ));
            }
        }
        let order = topological(&parents).ok_or_else(|| {
            let stuck: Vec<&str> = cycle_members(&parents)
                .into_iter()
                .map(|i| variables[i].name.as_str())
                .collect();
            bad(
                what,
                format!("the graph has a cycle through {}", stuck.join(", ")),
            )
        })?;
        Ok(Self {
            variables,
            parents,
            order,
            source: file,
        })
    }

    /// Index of a variable by name.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.variables.iter().position(|v| v.name == name)
    }

    /// Every descendant of `roots` (not the roots themselves), as a mask over variables.
    pub fn descendants(&self, roots: &[usize]) -> Vec<bool> {
        let mut below = vec![false; self.variables.len()];
        for &i in &self.order {
            if self.parents[i]
                .iter()
                .any(|&p| below[p] || roots.contains(&p))
            {
                below[i] = true;
            }
        }
        for &r in roots {
            below[r] = false;
        }
        below
    }
}

/// Kahn's algorithm, always taking the smallest ready index: `None` on a cycle.
fn topological(parents: &[Vec<usize>]) -> Option<Vec<usize>> {
    let n = parents.len();
    let mut waiting: Vec<usize> = parents.iter().map(Vec::len).collect();
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(&i) = ready.iter().next() {
        ready.remove(&i);
        order.push(i);
        for c in 0..n {
            if parents[c].contains(&i) {
                waiting[c] -= 1;
                if waiting[c] == 0 {
                    ready.insert(c);
                }
            }
        }
    }
    (order.len() == n).then_some(order)
}

/// The variables left when every variable that can be ordered is removed (those on or below a cycle).
fn cycle_members(parents: &[Vec<usize>]) -> Vec<usize> {
    let mut done = vec![false; parents.len()];
    loop {
        let next = (0..parents.len()).find(|&i| !done[i] && parents[i].iter().all(|&p| done[p]));
        match next {
            Some(i) => done[i] = true,
            None => break,
        }
    }
    (0..parents.len()).filter(|&i| !done[i]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_graph_is_the_papers() {
        let g = Graph::default_graph();
        assert_eq!(g.variables.len(), 19);
        let name = |i: usize| g.variables[i].name.as_str();
        let parents_of = |v: &str| -> Vec<&str> {
            g.parents[g.index(v).unwrap()]
                .iter()
                .map(|&i| name(i))
                .collect()
        };
        assert_eq!(
            parents_of("support_devices"),
            ["pleural_effusion", "pneumothorax"]
        );
        assert_eq!(parents_of("no_finding").len(), 13);
        assert!(parents_of("pneumothorax").contains(&"fracture"));
        for root in ["age", "race", "sex", "view", "dataset"] {
            assert!(parents_of(root).is_empty(), "{root}");
        }
        // Parents come first in the order.
        let at = |v: usize| g.order.iter().position(|&o| o == v).unwrap();
        for (c, ps) in g.parents.iter().enumerate() {
            for &p in ps {
                assert!(at(p) < at(c), "{} before {}", name(p), name(c));
            }
        }
        assert_eq!(g.variables[g.index("dataset").unwrap()].classes(), 7);
        assert_eq!(g.variables[g.index("age").unwrap()].kind, Kind::Age);
        // Descendants of sex include pneumonia and, through it, consolidation; not view.
        let below = g.descendants(&[g.index("sex").unwrap()]);
        assert!(below[g.index("consolidation").unwrap()] && !below[g.index("view").unwrap()]);
        assert!(!below[g.index("sex").unwrap()]);
    }

    #[test]
    fn a_flipped_pair_reorders_and_bad_graphs_are_named() {
        let flipped = DEFAULT_GRAPH
            .replace(
                "pneumothorax = [\"age\", \"sex\", \"fracture\"]",
                "pneumothorax = [\"age\", \"sex\", \"fracture\", \"support_devices\"]",
            )
            .replace(
                "support_devices = [\"pleural_effusion\", \"pneumothorax\"]",
                "support_devices = [\"pleural_effusion\"]",
            )
            .replace("parent = \"pneumothorax\"", "parent = \"support_devices\"");
        let g = Graph::parse(&flipped, "flipped").unwrap();
        let (pt, sd) = (
            g.index("pneumothorax").unwrap(),
            g.index("support_devices").unwrap(),
        );
        let at = |v: usize| g.order.iter().position(|&o| o == v).unwrap();
        assert!(at(sd) < at(pt));
        let err = |text: &str| Graph::parse(text, "g.toml").unwrap_err().to_string();
        assert!(err("[parents]\nfoo = [\"age\"]\n").contains("unknown variable `foo`"));
        assert!(
            err("[parents]\npneumonia = [\"consolidation\"]\nconsolidation = [\"pneumonia\"]\n")
                .contains("cycle")
        );
        assert!(err("[parents]\nsex = [\"sex\"]\n").contains("own parent"));
        // Both directions of the pair, or the pair without its direction: refused.
        let both = DEFAULT_GRAPH.replace(
            "pneumothorax = [\"age\", \"sex\", \"fracture\"]",
            "pneumothorax = [\"age\", \"sex\", \"fracture\", \"support_devices\"]",
        );
        assert!(err(&both).contains("choose one direction") || err(&both).contains("cycle"));
        let wrong =
            DEFAULT_GRAPH.replace("parent = \"pneumothorax\"", "parent = \"support_devices\"");
        assert!(err(&wrong).contains("choose one direction"));
    }
}
