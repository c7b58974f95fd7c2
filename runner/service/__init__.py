"""Service mode: `pipcook-sandbox server`, a multi-tenant HTTP API over a fair queue of runs.

db (SQLite state) <- tenants (who, quotas, uids, tokens) <- submit (validation, queueing)
<- scheduler (fair choice, engines, recovery) <- api (FastAPI routes) <- server (process);
client and cli are the tenant's side. See docs/service.md.
"""
