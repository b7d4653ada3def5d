"""Where statements go: classify/ (digest cache, lexer, rules, sqlglot) says what a statement is,
router.Router.plan decides where it runs (a Plan: decide, then the session acts), balancer picks
a replica, state.SessionState holds what ties a session to the primary and its SET/USE history,
statements maps client statement ids to each backend's.
"""
