//! The behaviour every backend must show with silences, as one suite each backend
//! runs, like the device store's (`storage/conformance.rs`); kept apart so the two
//! lists grow without touching each other. A backend's tests instantiate them all with
//! [`silence_conformance!`]; one left out of the macro's list is dead code, which
//! clippy refuses.

use std::sync::Arc;

use super::{Store, StoreError};
use crate::clock::Timestamp;
use crate::device::DeviceId;
use crate::labels::Labels;
use crate::silence::{IdPattern, NewSilence, SilenceMatcher};

/// Every silence conformance test as a `#[tokio::test]` of its own, run against the
/// store `$store` evaluates to: a `(store, guard)` pair, as for the device store.
macro_rules! silence_conformance {
    ($store:expr) => {
        $crate::storage::silence_conformance::silence_conformance!($store =>
            a_silence_is_kept_as_created_with_each_kind_of_matcher,
            silences_lists_those_ending_after_the_time_given_by_start_then_id,
            expiring_ends_a_silence_now_and_an_unknown_one_is_not_found,
        );
    };
    ($store:expr => $($test:ident),+ $(,)?) => {
        $(
            #[tokio::test]
            async fn $test() {
                let (store, _guard) = $store;
                $crate::storage::silence_conformance::$test(std::sync::Arc::new(store)).await;
            }
        )+
    };
}
pub(crate) use silence_conformance;

/// A time in seconds after a fixed instant of 2027.
fn at(s: i64) -> Timestamp {
    Timestamp::from_unix_millis(1_800_000_000_000 + s * 1_000)
}

fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).expect("valid id")
}

fn new(matcher: SilenceMatcher, from: i64, until: i64, comment: Option<&str>) -> NewSilence {
    NewSilence {
        matcher,
        starts_at: at(from),
        ends_at: at(until),
        comment: comment.map(str::to_string),
    }
}

fn pattern(text: &str) -> SilenceMatcher {
    SilenceMatcher::Pattern(IdPattern::parse(text).expect("pattern"))
}

pub(crate) async fn a_silence_is_kept_as_created_with_each_kind_of_matcher(store: Arc<dyn Store>) {
    let labels: Labels =
        serde_json::from_value(serde_json::json!({"site": "north", "kind": "pump"}))
            .expect("labels");
    let matchers = [
        SilenceMatcher::devices(vec![id("pump-2"), id("pump-1")]),
        pattern("pump-*"),
        SilenceMatcher::Labels(labels),
    ];
    let mut created = Vec::new();
    for (i, matcher) in matchers.into_iter().enumerate() {
        let comment = (i != 1).then_some("new filters, site north ✓");
        let silence = store
            .create_silence(&new(matcher.clone(), 0, 3_600, comment), at(-5))
            .await
            .expect("create");
        assert_eq!(silence.matcher, matcher);
        assert_eq!(
            (silence.starts_at, silence.ends_at, silence.created_at),
            (at(0), at(3_600), at(-5))
        );
        assert_eq!(silence.comment.as_deref(), comment);
        created.push(silence);
    }
    assert!(
        created.windows(2).all(|w| w[0].id < w[1].id),
        "ids are given in order"
    );
    assert_eq!(store.silences(at(0)).await.expect("list"), created);
}

pub(crate) async fn silences_lists_those_ending_after_the_time_given_by_start_then_id(
    store: Arc<dyn Store>,
) {
    let mut ids = Vec::new();
    for (from, until) in [(100, 200), (0, 50), (100, 150), (300, 400)] {
        let silence = store
            .create_silence(&new(pattern("*"), from, until, None), at(0))
            .await
            .expect("create");
        ids.push(silence.id);
    }
    let listed = |after: i64| {
        let store = Arc::clone(&store);
        async move {
            store
                .silences(at(after))
                .await
                .expect("list")
                .into_iter()
                .map(|s| s.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed(0).await, [ids[1], ids[0], ids[2], ids[3]]);
    assert_eq!(
        listed(50).await,
        [ids[0], ids[2], ids[3]],
        "one ending at the time given is over"
    );
    assert_eq!(listed(150).await, [ids[0], ids[3]]);
    assert_eq!(listed(399).await, [ids[3]]);
    assert!(listed(400).await.is_empty());
}

pub(crate) async fn expiring_ends_a_silence_now_and_an_unknown_one_is_not_found(
    store: Arc<dyn Store>,
) {
    let running = store
        .create_silence(&new(pattern("a*"), 0, 1_000, Some("x")), at(0))
        .await
        .expect("create");
    let future = store
        .create_silence(&new(pattern("b*"), 500, 1_000, None), at(0))
        .await
        .expect("create");
    let ended = store
        .create_silence(&new(pattern("c*"), 0, 50, None), at(0))
        .await
        .expect("create");

    let expired = store
        .expire_silence(running.id, at(100))
        .await
        .expect("expire");
    assert_eq!((expired.starts_at, expired.ends_at), (at(0), at(100)));
    assert_eq!(
        (expired.id, &expired.matcher, &expired.comment),
        (running.id, &running.matcher, &running.comment)
    );
    let expired = store
        .expire_silence(future.id, at(100))
        .await
        .expect("expire");
    assert_eq!(
        (expired.starts_at, expired.ends_at),
        (at(100), at(100)),
        "a silence still to come ends empty"
    );
    let again = store
        .expire_silence(ended.id, at(100))
        .await
        .expect("expire");
    assert_eq!(again, ended, "an ended silence stays as it was");
    assert!(store.silences(at(100)).await.expect("list").is_empty());
    assert_eq!(
        store.silences(at(0)).await.expect("list").len(),
        3,
        "expired silences are kept as a record"
    );
    assert!(matches!(
        store.expire_silence(ended.id + 1_000, at(100)).await,
        Err(StoreError::SilenceNotFound(n)) if n == ended.id + 1_000
    ));
}
