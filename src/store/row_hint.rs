//! Where the store last saw a claimed delivery's outbox row, so that its outcome can find the
//! row without looking its key up in the primary-key index: PostgreSQL's `ctid` (block and
//! line pointer) as the append or the claim wrote it. EXPLAIN ANALYZE of a Sent batch of 1,000
//! rows: 2.3–2.6 ms by ctid, 4.1–8.6 ms by key (random keys; in the pipeline bench, whose v7
//! keys keep the index pages hot, the gain was within noise).
//!
//! A hint is never trusted alone: the outcome still matches the row's key, status and attempt,
//! so a hint that points elsewhere (the row was claimed again, which writes a new version, or
//! its slot was reused after a vacuum) matches nothing, as a stale attempt does. Every rewrite
//! of a `sending` row changes its status or attempt anyway, so a hint only misses a row its
//! outcome still holds after a table rewrite (`VACUUM FULL`, `CLUSTER`): that outcome is lost
//! and the delivery is sent again when its lease ends, which processing at least once allows.

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{PgArgumentBuffer, PgHasArrayType, PgTypeInfo, PgValueFormat, PgValueRef};
use sqlx::{Decode, Encode, Postgres, Type};

/// Where a claimed delivery's outbox row was when it was claimed; none finds it by key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowHint(pub(super) Option<Tid>);

/// A PostgreSQL tuple id (`tid`): heap block and line pointer, as the binary protocol sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tid {
    block: u32,
    offset: u16,
}

/// `tid` and `tid[]` in `pg_type` (fixed OIDs: no lookup by name on each connection).
const TID: Oid = Oid(27);
const TID_ARRAY: Oid = Oid(1010);

impl Type<Postgres> for Tid {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(TID)
    }
}

impl PgHasArrayType for Tid {
    fn array_type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(TID_ARRAY)
    }
}

impl Encode<'_, Postgres> for Tid {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        buf.extend(&self.block.to_be_bytes());
        buf.extend(&self.offset.to_be_bytes());
        Ok(IsNull::No)
    }
}

impl Decode<'_, Postgres> for Tid {
    fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
        match value.format() {
            PgValueFormat::Binary => {
                let bytes: [u8; 6] = value
                    .as_bytes()?
                    .try_into()
                    .map_err(|_| "a tid is six bytes")?;
                Ok(Tid {
                    block: u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
                    offset: u16::from_be_bytes([bytes[4], bytes[5]]),
                })
            }
            PgValueFormat::Text => {
                let text = value.as_str()?;
                let inner = text
                    .strip_prefix('(')
                    .and_then(|t| t.strip_suffix(')'))
                    .ok_or("a tid is (block,offset)")?;
                let (block, offset) = inner.split_once(',').ok_or("a tid is (block,offset)")?;
                Ok(Tid {
                    block: block.parse()?,
                    offset: offset.parse()?,
                })
            }
        }
    }
}
