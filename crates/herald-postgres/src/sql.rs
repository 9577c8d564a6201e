//! The relay's statements that honour parked aggregates, assembled once
//! from `src/sql/`: each writes `{NOT_HELD_BACK}` where the rule of
//! `sql/not_held_back.sql` applies, instead of its own copy of the rule.

use std::sync::LazyLock;

/// Whether a pending event `p` (of outbox row `o`) may be claimed: no
/// earlier event of its aggregate is parked.
const NOT_HELD_BACK: &str = include_str!("sql/not_held_back.sql");

/// `query` with the rule in place of its `{NOT_HELD_BACK}` markers.
fn assemble(query: &str) -> String {
    query.replace("{NOT_HELD_BACK}", NOT_HELD_BACK.trim_end())
}

/// `sql/relay_claim.sql`: one shard's claimable events.
pub(crate) static RELAY_CLAIM: LazyLock<String> =
    LazyLock::new(|| assemble(include_str!("sql/relay_claim.sql")));

/// `sql/relay_claim_slot.sql`: a slot's shards' claimable events.
pub(crate) static RELAY_CLAIM_SLOT: LazyLock<String> =
    LazyLock::new(|| assemble(include_str!("sql/relay_claim_slot.sql")));

/// `sql/relay_shards.sql`: the shards with claimable events.
pub(crate) static RELAY_SHARDS: LazyLock<String> =
    LazyLock::new(|| assemble(include_str!("sql/relay_shards.sql")));

/// Whether any pending event is claimable (parked aggregates' events wait
/// for a person, and do not count).
pub(crate) static HAS_BACKLOG: LazyLock<String> = LazyLock::new(|| {
    assemble(
        "SELECT EXISTS (
             SELECT 1 FROM herald_outbox_pending p
             JOIN herald_outbox o ON o.id = p.id
             WHERE {NOT_HELD_BACK})",
    )
});

#[cfg(test)]
mod tests {
    #[test]
    fn every_marker_is_replaced() {
        for query in [
            &*super::RELAY_CLAIM,
            &*super::RELAY_CLAIM_SLOT,
            &*super::RELAY_SHARDS,
            &*super::HAS_BACKLOG,
        ] {
            assert!(query.contains("herald_outbox_refused r"), "{query}");
            assert!(!query.contains('{'), "{query}");
        }
    }
}
