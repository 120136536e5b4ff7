//! The route table: route templates to representations.

use super::path::{canonical, check};
use crate::build_error::BuildError;
use crate::fnv::FnvState;
use crate::limit::RateLimit;
use crate::reject::Rejection;
use crate::scope::{Action, RequiredScope};
use crate::usage::RouteUsage;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// What a route in the table asks of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// No key needed.
    Public,
    /// A key with the method's action on this representation.
    Resource(Arc<str>),
    /// Not in the table: see [`Unmapped`].
    Unmapped,
}

/// What a request needs to pass its route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Requirement {
    /// Nothing: a public route.
    Nothing,
    /// Any valid key (an unmapped route under [`Unmapped::AnyValidKey`]).
    AnyKey,
    /// A key holding this scope.
    Scope(RequiredScope),
}

impl Requirement {
    /// The scope the key must hold, if any.
    #[inline]
    pub(crate) fn scope(self) -> Option<RequiredScope> {
        match self {
            Self::Scope(scope) => Some(scope),
            Self::Nothing | Self::AnyKey => None,
        }
    }
}

/// A row of the table: the route, the template it was registered under, and its policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RouteEntry {
    pub(crate) template: Option<Arc<str>>,
    /// The layer's limits and this route's, each once, at the route's cost: set when the layer is
    /// built, so a request whose key has no limit of its own makes no list.
    pub(crate) limits: Vec<(RateLimit, u64)>,
    /// Its decisions, counted (feature `metrics`).
    pub(crate) decisions: crate::observe::RouteDecisions,
    pub(crate) route: Route,
    pub(crate) policy: RoutePolicy,
}

impl RouteEntry {
    /// The entry of requests no template matched.
    pub(crate) fn without_template() -> Self {
        let policy = RoutePolicy::new();
        Self { template: None, limits: Vec::new(), decisions: Default::default(), route: Route::Unmapped, policy }
    }

    /// Sets [`limits`](Self::limits) from the layer's.
    fn combine(&mut self, layer: &[RateLimit]) {
        self.limits.clear();
        for limit in layer.iter().chain(&self.policy.limits) {
            if !self.limits.iter().any(|(l, _)| l == limit) {
                self.limits.push((limit.clone(), self.policy.cost));
            }
        }
    }
}

#[doc = include_str!("../../docs/route_policy.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePolicy {
    pub(crate) cost: u64,
    pub(crate) limits: Vec<RateLimit>,
    pub(crate) usage: Option<RouteUsage>,
}

impl RoutePolicy {
    const DEFAULT: Self = Self { cost: 1, limits: Vec::new(), usage: None };

    /// Cost 1, no limits of its own, no usage.
    #[must_use]
    pub fn new() -> Self {
        Self::DEFAULT
    }

    /// What one request counts against each rate limit (default 1).
    #[must_use]
    pub fn cost(mut self, cost: u64) -> Self {
        self.cost = cost;
        self
    }

    /// A rate limit for this route only, on top of the layer's and the key's.
    #[must_use]
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.limits.push(limit);
        self
    }

    /// Usage charged per request: `amount` of `name` (Oneloop's `billing.usage` and `usageName`).
    #[must_use]
    pub fn usage(mut self, amount: u64, name: Option<&str>) -> Self {
        self.usage = Some(RouteUsage { amount, name: name.map(Arc::from) });
        self
    }
}

impl Default for RoutePolicy {
    fn default() -> Self {
        Self::new()
    }
}

#[doc = include_str!("../../docs/unmapped.md")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Unmapped {
    /// Any valid key passes, with no scope check (the default): the table only narrows access.
    /// Routes can still check scopes themselves with [`require`](crate::require).
    #[default]
    AnyValidKey,
    /// Strict mode: refused with `403`, so a route nobody mapped is never open by accident.
    Deny,
}

#[doc = include_str!("../../docs/route_table.md")]
#[derive(Clone)]
pub struct RouteTable {
    matcher: matchit::Router<usize>,
    /// By the template axum matched: trusted strings (the application's own), so hashed with
    /// FNV-1a rather than a DoS-resistant hash.
    by_template: HashMap<Box<str>, usize, FnvState>,
    routes: Vec<Arc<RouteEntry>>,
    unmapped_entry: Arc<RouteEntry>,
    unmapped: Unmapped,
    matrix: bool,
    error: Option<BuildError>,
}

impl RouteTable {
    /// An empty table: every route is unmapped.
    #[must_use]
    pub fn new() -> Self {
        Self {
            matcher: matchit::Router::new(),
            by_template: HashMap::default(),
            routes: Vec::new(),
            unmapped_entry: Arc::new(RouteEntry::without_template()),
            unmapped: Unmapped::default(),
            matrix: false,
            error: None,
        }
    }

    /// Requests on `template` need the method's action on `representation`.
    #[must_use]
    pub fn route(self, template: &str, representation: &str) -> Self {
        self.route_with(template, representation, RoutePolicy::new())
    }

    /// Like [`route`](Self::route), with a cost, rate limits or usage.
    #[must_use]
    pub fn route_with(self, template: &str, representation: &str, policy: RoutePolicy) -> Self {
        if representation.is_empty() {
            return self.fail(template, "the representation is empty".into());
        }
        if policy.cost == 0 {
            return self.fail(template, "a route's cost is at least 1".into());
        }
        self.insert(template, Route::Resource(representation.into()), policy)
    }

    /// Requests on `template` need no key.
    #[must_use]
    pub fn public(self, template: &str) -> Self {
        self.insert(template, Route::Public, RoutePolicy::new())
    }

    /// What happens on routes not in the table.
    #[must_use]
    pub fn unmapped(mut self, policy: Unmapped) -> Self {
        self.unmapped = policy;
        self
    }

    /// Accept `;` path parameters (matrix parameters, `/items;v=2/3`), reading each segment without
    /// them, as servers that use them do (default: refused with `400 invalid-path`, because servers
    /// that strip them would read `/items/..;/admin` as `/admin`). Turn on only if your inner service
    /// strips them too.
    #[must_use]
    pub fn matrix_parameters(mut self, allow: bool) -> Self {
        self.matrix = allow;
        self
    }

    /// The policy for unmapped routes.
    pub fn unmapped_policy(&self) -> Unmapped {
        self.unmapped
    }

    /// What `entry` (found by [`resolve`](Self::resolve)) needs from a request with `method`.
    #[inline]
    pub(crate) fn requirement(&self, entry: &RouteEntry, method: &http::Method) -> Result<Requirement, Rejection> {
        match &entry.route {
            Route::Public => Ok(Requirement::Nothing),
            Route::Resource(representation) => {
                let action = Action::from_method(method).ok_or(Rejection::UnmappedRoute)?;
                Ok(Requirement::Scope(RequiredScope { representation: representation.clone(), action }))
            }
            Route::Unmapped => match self.unmapped {
                Unmapped::AnyValidKey => Ok(Requirement::AnyKey),
                Unmapped::Deny => Err(Rejection::UnmappedRoute),
            },
        }
    }

    fn insert(mut self, template: &str, route: Route, policy: RoutePolicy) -> Self {
        if self.error.is_some() {
            return self;
        }
        if !template.starts_with('/') {
            return self.fail(template, "a template starts with `/`".into());
        }
        let index = self.routes.len();
        // The own matcher sees canonical (lowercase) paths, so it holds lowercase templates.
        if let Err(e) = self.matcher.insert(template.to_ascii_lowercase(), index) {
            return self.fail(template, e.to_string());
        }
        self.by_template.insert(template.into(), index);
        self.routes.push(Arc::new(RouteEntry {
            template: Some(template.into()),
            limits: Vec::new(),
            decisions: Default::default(),
            route,
            policy,
        }));
        self
    }

    fn fail(mut self, template: &str, reason: String) -> Self {
        self.error.get_or_insert(BuildError::Route { template: template.into(), reason });
        self
    }

    /// Gives every entry, unmapped routes' included, the layer's limits (see [`RouteEntry::limits`]).
    pub(crate) fn with_layer_limits(mut self, layer: &[RateLimit]) -> Self {
        for entry in self.routes.iter_mut().chain([&mut self.unmapped_entry]) {
            Arc::make_mut(entry).combine(layer);
        }
        self
    }

    pub(crate) fn take_error(&mut self) -> Option<BuildError> {
        self.error.take()
    }

    /// The route for a request: by axum's matched template when there is one in the table, else by
    /// the canonical path.
    pub(crate) fn resolve(&self, matched: Option<&str>, path: &str) -> Result<&Arc<RouteEntry>, Rejection> {
        // Even a matched route or an empty table refuses an ambiguous path: the inner service may
        // read it differently from the router.
        check(path, self.matrix)?;
        if let Some(&i) = matched.and_then(|t| self.by_template.get(t)) {
            return Ok(&self.routes[i]);
        }
        let path = canonical(path, self.matrix)?;
        Ok(match self.matcher.at(&path) {
            Ok(m) => &self.routes[*m.value],
            Err(_) => &self.unmapped_entry,
        })
    }
}

impl Default for RouteTable {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut routes: Vec<_> = self.by_template.iter().map(|(t, &i)| (t, &self.routes[i].route)).collect();
        routes.sort_by(|a, b| a.0.cmp(b.0));
        f.debug_struct("RouteTable").field("routes", &routes).field("unmapped", &self.unmapped).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_and_paths() {
        let map = RouteTable::new().public("/health").route("/v1/items/{id}", "items").route("/v1/Admin", "admin");
        assert_eq!(&map.resolve(None, "/health").unwrap().route, &Route::Public);
        assert_eq!(&map.resolve(None, "/V1/ITEMS/ABC").unwrap().route, &Route::Resource("items".into()));
        assert_eq!(&map.resolve(None, "/v1/admin/").unwrap().route, &Route::Resource("admin".into()));
        assert_eq!(&map.resolve(Some("/v1/items/{id}"), "/whatever").unwrap().route, &Route::Resource("items".into()));
        assert_eq!(&map.resolve(Some("/not/mapped"), "/v1/items/1").unwrap().route, &Route::Resource("items".into()));
        assert_eq!(&map.resolve(None, "/nope").unwrap().route, &Route::Unmapped);
    }

    #[test]
    fn bad_tables_say_what_is_wrong() {
        let mut map = RouteTable::new().route("/a/{id}", "x").route("/a/{other}", "y");
        let err = map.take_error().unwrap().to_string();
        assert!(err.contains("/a/{other}"), "{err}");
        let mut map = RouteTable::new().route("nope", "x");
        assert!(map.take_error().unwrap().to_string().contains("starts with"));
    }
}
