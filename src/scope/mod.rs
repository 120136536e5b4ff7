//! Scopes in Oneloop's model: a resource `representation` plus `create`/`read`/`update`/`del`.
//!
//! The method gives the [`Action`]; the route gives the representation, from a [`RouteTable`](crate::RouteTable) on the
//! layer or a [`require`](crate::require()) annotation on the route.

use http::Method;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

#[doc = include_str!("../../docs/action.md")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Action {
    /// `POST`.
    Create,
    /// `GET`, `HEAD`.
    Read,
    /// `PUT`, `PATCH`.
    Update,
    /// `DELETE` (Oneloop spells it `del`).
    Del,
}

impl Action {
    /// The action of a method; `None` for methods with no action (`OPTIONS`, `TRACE`, `CONNECT`,
    /// extensions), which a scoped route therefore refuses.
    ///
    /// ```
    /// use keygate::Action;
    /// use http::Method;
    /// assert_eq!(Action::from_method(&Method::HEAD), Some(Action::Read));
    /// assert_eq!(Action::from_method(&Method::PATCH), Some(Action::Update));
    /// assert_eq!(Action::from_method(&Method::OPTIONS), None);
    /// ```
    #[must_use]
    pub fn from_method(method: &Method) -> Option<Self> {
        Some(match *method {
            Method::GET | Method::HEAD => Self::Read,
            Method::POST => Self::Create,
            Method::PUT | Method::PATCH => Self::Update,
            Method::DELETE => Self::Del,
            _ => return None,
        })
    }

    /// Oneloop's name: `create`, `read`, `update` or `del`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Read => "read",
            Self::Update => "update",
            Self::Del => "del",
        }
    }
}

#[doc = include_str!("../../docs/scope.md")]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// Oneloop's optional scope id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The resource, such as `items`.
    pub representation: String,
    /// May create.
    pub create: bool,
    /// May read.
    pub read: bool,
    /// May update.
    pub update: bool,
    /// May delete.
    pub del: bool,
}

impl Scope {
    /// A scope with no actions; add them with [`Scope::with`].
    pub fn new(representation: impl Into<String>) -> Self {
        Self { id: None, representation: representation.into(), create: false, read: false, update: false, del: false }
    }

    /// Every action on `representation`.
    pub fn all(representation: impl Into<String>) -> Self {
        Self { create: true, read: true, update: true, del: true, ..Self::new(representation) }
    }

    /// This scope with `action` allowed too.
    #[must_use]
    pub fn with(mut self, action: Action) -> Self {
        *self.flag_mut(action) = true;
        self
    }

    /// Whether this scope allows `action` on `representation`.
    #[must_use]
    pub fn allows(&self, representation: &str, action: Action) -> bool {
        self.representation == representation && self.flag(action)
    }

    fn flag(&self, action: Action) -> bool {
        match action {
            Action::Create => self.create,
            Action::Read => self.read,
            Action::Update => self.update,
            Action::Del => self.del,
        }
    }

    fn flag_mut(&mut self, action: Action) -> &mut bool {
        match action {
            Action::Create => &mut self.create,
            Action::Read => &mut self.read,
            Action::Update => &mut self.update,
            Action::Del => &mut self.del,
        }
    }
}

const ACTIONS: [Action; 4] = [Action::Create, Action::Read, Action::Update, Action::Del];

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.representation)?;
        let mut first = true;
        for action in ACTIONS.into_iter().filter(|a| self.flag(*a)) {
            f.write_str(if first { "" } else { "," })?;
            f.write_str(action.as_str())?;
            first = false;
        }
        Ok(())
    }
}

#[doc = include_str!("../../docs/parse_scope_error.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseScopeError(String);

impl fmt::Display for ParseScopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid scope {:?}: expected `representation:action[,action]` with actions create, read, update, del, or `representation:*`", self.0)
    }
}

impl std::error::Error for ParseScopeError {}

impl FromStr for Scope {
    type Err = ParseScopeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseScopeError(s.to_owned());
        let (repr, actions) = s.split_once(':').ok_or_else(err)?;
        if repr.is_empty() || actions.is_empty() {
            return Err(err());
        }
        if actions == "*" {
            return Ok(Self::all(repr));
        }
        actions.split(',').try_fold(Self::new(repr), |scope, a| {
            let action = ACTIONS.into_iter().find(|x| x.as_str() == a.trim()).ok_or_else(err)?;
            Ok(scope.with(action))
        })
    }
}

#[doc = include_str!("../../docs/required_scope.md")]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequiredScope {
    /// The resource.
    pub representation: Arc<str>,
    /// What the request does to it.
    pub action: Action,
}

impl RequiredScope {
    /// `action` on `representation`.
    pub fn new(representation: impl Into<Arc<str>>, action: Action) -> Self {
        Self { representation: representation.into(), action }
    }

    /// Whether any of `scopes` grants this.
    #[must_use]
    pub fn granted_by(&self, scopes: &[Scope]) -> bool {
        scopes.iter().any(|s| s.allows(&self.representation, self.action))
    }

    /// As a Oneloop `ApiKeyScope` with only this action set.
    #[must_use]
    pub fn to_scope(&self) -> Scope {
        Scope::new(&*self.representation).with(self.action)
    }
}

impl fmt::Display for RequiredScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.representation, self.action.as_str())
    }
}
