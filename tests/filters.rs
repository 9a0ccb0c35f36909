//! Subscription filters: every operator, nesting, missing fields, type mismatches and paths
//! through the public API; `p.filter` over real sockets, invalid filters in `failed_topics`,
//! and one evaluation per distinct filter per publication.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use wsengine::client::Client;
use wsengine::services::bus::{Bus, MemoryBus};
use wsengine::services::connection::{Connection, ConnectionId, Delivery};
use wsengine::services::publication::Publication;
use wsengine::{Envelope, Filter, WireFormat};

fn matches(filter: Value, payload: Value) -> bool {
    Filter::compile(&filter).unwrap_or_else(|e| panic!("{filter} should compile: {e}")).matches(&payload)
}

fn refusal(filter: Value) -> String {
    Filter::compile(&filter).expect_err("should be refused").to_string()
}

#[test]
fn every_comparison_operator() {
    let quote = json!({"symbol": "AAPL", "price": 187.5, "size": 100, "venue": "XNAS", "tags": ["block", "odd"]});
    let cases = [
        (json!({"symbol": "AAPL"}), true),
        (json!({"symbol": "MSFT"}), false),
        (json!({"symbol": {"$eq": "AAPL"}}), true),
        (json!({"size": {"$eq": 100.0}}), true),
        (json!({"symbol": {"$ne": "MSFT"}}), true),
        (json!({"symbol": {"$ne": "AAPL"}}), false),
        (json!({"price": {"$gt": 187}}), true),
        (json!({"price": {"$gt": 187.5}}), false),
        (json!({"price": {"$gte": 187.5}}), true),
        (json!({"price": {"$lt": 188}}), true),
        (json!({"price": {"$lt": 187.5}}), false),
        (json!({"price": {"$lte": 187.5}}), true),
        (json!({"size": {"$gt": 99.5, "$lt": 100.5}}), true),
        (json!({"symbol": {"$gt": "AAA", "$lt": "AAZ"}}), true),
        (json!({"symbol": {"$gt": "AAQ"}}), false),
        (json!({"symbol": {"$gte": "AAPL", "$lte": "AAPL"}}), true),
        (json!({"venue": {"$in": ["XNYS", "XNAS"]}}), true),
        (json!({"venue": {"$in": []}}), false),
        (json!({"size": {"$in": [1, 100.0]}}), true),
        (json!({"venue": {"$nin": ["XNYS", "XNAS"]}}), false),
        (json!({"venue": {"$nin": ["XNYS"]}}), true),
        (json!({"symbol": {"$regex": "^A{2}PL$"}}), true),
        (json!({"symbol": {"$regex": "(?i)^aapl$"}}), true),
        (json!({"symbol": {"$regex": "^MS"}}), false),
        (json!({"price": {"$exists": true}}), true),
        (json!({"price": {"$exists": false}}), false),
        (json!({"symbol": {"$contains": "AP"}}), true),
        (json!({"symbol": {"$contains": "ZZ"}}), false),
        (json!({"tags": {"$contains": "block"}}), true),
        (json!({"tags": {"$contains": "lot"}}), false),
        (json!({"symbol": {"$startswith": "AA"}}), true),
        (json!({"symbol": {"$startswith": "PL"}}), false),
        (json!({"symbol": {"$endswith": "PL"}}), true),
        (json!({"symbol": {"$endswith": "AA"}}), false),
        (json!({"tags": ["block", "odd"]}), true),
        (json!({}), true),
    ];
    for (filter, expected) in cases {
        assert_eq!(matches(filter.clone(), quote.clone()), expected, "{filter}");
    }
}

#[test]
fn and_or_nest_within_each_other() {
    let filter = json!({
        "$or": [
            {"$and": [{"symbol": "AAPL"}, {"$or": [{"price": {"$lt": 100}}, {"price": {"$gt": 200}}]}]},
            {"$and": [{"symbol": "MSFT"}, {"size": {"$gte": 1000}}]}
        ]
    });
    assert!(matches(filter.clone(), json!({"symbol": "AAPL", "price": 250})));
    assert!(!matches(filter.clone(), json!({"symbol": "AAPL", "price": 150})));
    assert!(matches(filter.clone(), json!({"symbol": "MSFT", "size": 1000})));
    assert!(!matches(filter.clone(), json!({"symbol": "MSFT", "size": 10})));
    // Keys of one object are ANDed, with $and and $or among them.
    let combined =
        json!({"symbol": "AAPL", "$or": [{"venue": "XNAS"}, {"venue": "XNYS"}], "$and": [{"size": {"$gt": 0}}]});
    assert!(matches(combined.clone(), json!({"symbol": "AAPL", "venue": "XNYS", "size": 5})));
    assert!(!matches(combined, json!({"symbol": "AAPL", "venue": "BATS", "size": 5})));
}

#[test]
fn missing_fields_match_only_ne_nin_and_not_exists() {
    let empty = json!({"other": 1});
    for (filter, expected) in [
        (json!({"price": 1}), false),
        (json!({"price": {"$eq": null}}), false),
        (json!({"price": {"$ne": 1}}), true),
        (json!({"price": {"$nin": [1, 2]}}), true),
        (json!({"price": {"$in": [1, null]}}), false),
        (json!({"price": {"$gt": 0}}), false),
        (json!({"price": {"$lte": 0}}), false),
        (json!({"price": {"$regex": ".*"}}), false),
        (json!({"price": {"$exists": false}}), true),
        (json!({"price": {"$exists": true}}), false),
        (json!({"price": {"$contains": "x"}}), false),
        (json!({"price": {"$startswith": ""}}), false),
        (json!({"price.deep": {"$ne": 1}}), true),
    ] {
        assert_eq!(matches(filter.clone(), empty.clone()), expected, "{filter}");
    }
    // A present null exists and equals null.
    assert!(matches(json!({"price": {"$exists": true}}), json!({"price": null})));
    assert!(matches(json!({"price": null}), json!({"price": null})));
}

#[test]
fn type_mismatches_are_false_never_errors() {
    let payload = json!({"price": "187.5", "size": 100, "flag": true, "list": [1, 2], "obj": {"a": 1}});
    for (filter, expected) in [
        (json!({"price": {"$gt": 100}}), false),
        (json!({"size": {"$gt": "1"}}), false),
        (json!({"price": 187.5}), false),
        (json!({"size": "100"}), false),
        (json!({"size": {"$regex": "100"}}), false),
        (json!({"size": {"$startswith": "1"}}), false),
        (json!({"flag": {"$contains": "t"}}), false),
        (json!({"obj": {"$lt": 5}}), false),
        (json!({"list": {"$gt": 0}}), false),
        (json!({"list": {"$contains": 2.0}}), true),
        (json!({"size": {"$ne": "100"}}), true),
        (json!({"obj": {"a": 1.0}}), true),
        (json!({"price": {"$in": [187.5]}}), false),
    ] {
        assert_eq!(matches(filter.clone(), payload.clone()), expected, "{filter}");
    }
    // Large integers compare exactly; mixed int/float numerically.
    assert!(matches(json!({"n": {"$gt": 9_007_199_254_740_992_u64}}), json!({"n": 9_007_199_254_740_993_u64})));
    assert!(matches(json!({"n": {"$lt": 0.5}}), json!({"n": -3})));
    assert!(matches(json!({"n": {"$gt": -1}}), json!({"n": u64::MAX})));
}

#[test]
fn paths_are_relative_to_the_payload() {
    let payload = json!({"quote": {"bid": {"px": 10}}, "legs": [{"price": 1}, {"price": 2}], "p": 7});
    assert!(matches(json!({"quote.bid.px": 10}), payload.clone()));
    assert!(matches(json!({"payload.quote.bid.px": 10}), payload.clone()));
    assert!(matches(json!({"p.quote.bid.px": {"$gte": 10}}), payload.clone()));
    assert!(matches(json!({"legs.1.price": 2}), payload.clone()));
    assert!(!matches(json!({"legs.5.price": {"$exists": true}}), payload.clone()));
    assert!(!matches(json!({"legs.x": {"$exists": true}}), payload.clone()));
    // A single segment `p` is the payload's own field `p`.
    assert!(matches(json!({"p": 7}), payload.clone()));
    assert!(matches(json!({"p.p": 7}), payload));
}

#[test]
fn invalid_filters_are_refused_with_a_reason() {
    let mut deep = json!({"a": 1});
    for _ in 0..9 {
        deep = json!({"$and": [deep]});
    }
    let many: serde_json::Map<String, Value> = (0..300).map(|i| (format!("f{i}"), json!(i))).collect();
    for (filter, expected) in [
        (json!({"price": {"$near": 1}}), "unknown operator $near"),
        (json!({"$nor": [{"a": 1}]}), "unknown operator $nor"),
        (json!({"symbol": {"$regex": "(unclosed"}}), "$regex pattern is invalid"),
        (json!({"symbol": {"$regex": "a".repeat(300)}}), "longer than 256 bytes"),
        (json!({"symbol": {"$regex": "\\w{1000}\\w{1000}"}}), "$regex pattern is invalid"),
        (deep, "nested deeper than 8 levels"),
        (Value::Object(many), "more than 256 conditions"),
        (json!({"price": {"$gt": true}}), "$gt needs a number or a string"),
        (json!({"price": {"$in": "AAPL"}}), "$in needs an array"),
        (json!({"price": {"$exists": 1}}), "$exists needs a boolean"),
        (json!({"price": {"$regex": 5}}), "$regex needs a string"),
        (json!({"price": {"$startswith": 5}}), "$startswith needs a string"),
        (json!({"price": {"$contains": [1]}}), "$contains needs a string, a number or a boolean"),
        (json!({"$or": []}), "$or needs at least one expression"),
        (json!({"$and": {"a": 1}}), "$and needs an array"),
        (json!({"$or": [1]}), "must be a JSON object"),
        (json!({"price": {"$gt": 1, "plain": 2}}), "mixes operators"),
        (json!({"a..b": 1}), "empty segment"),
        (json!("AAPL"), "must be a JSON object"),
    ] {
        let reason = refusal(filter.clone());
        assert!(reason.contains(expected), "{filter}: {reason:?} should mention {expected:?}");
    }
}

fn bus_connection() -> (Arc<Connection>, wsengine::services::connection::DeliveryReceiver) {
    let (tx, rx) = wsengine::services::connection::delivery_channel(64);
    (Arc::new(Connection::new(ConnectionId::new(), None, WireFormat::Json, tx)), rx)
}

#[tokio::test]
async fn a_publication_is_evaluated_once_per_distinct_filter() {
    let bus = MemoryBus::new();
    // Field names unique to this test: interned filters are shared process-wide.
    let cheap = Filter::intern(&json!({"once_test_symbol": "AAPL"})).unwrap();
    let pricey = Filter::intern(&json!({"once_test_price": {"$gt": 100}})).unwrap();
    let mut receivers = Vec::new();
    for i in 0..10 {
        let (connection, rx) = bus_connection();
        let filter = if i % 2 == 0 { &cheap } else { &pricey };
        // Half on the exact topic, half through a pattern.
        let topic = if i < 6 { "quotes" } else { "quo*" };
        assert!(bus.set_filter(connection.id(), topic, Some(Arc::clone(filter))));
        bus.subscribe(&connection, topic);
        receivers.push(rx);
    }
    let (unfiltered, mut unfiltered_rx) = bus_connection();
    bus.subscribe(&unfiltered, "quotes");

    let quote = |symbol: &str, price: f64| {
        Publication::new("quotes", Envelope::new("q", json!({"once_test_symbol": symbol, "once_test_price": price})))
    };
    let report = bus.publish(quote("AAPL", 50.0)).await.unwrap();
    assert_eq!(report.delivered, 5 + 1, "the five cheap subscribers and the unfiltered one");
    assert_eq!((cheap.evaluations(), pricey.evaluations()), (1, 1));
    let report = bus.publish(quote("MSFT", 150.0)).await.unwrap();
    assert_eq!(report.delivered, 5 + 1);
    assert_eq!((cheap.evaluations(), pricey.evaluations()), (2, 2));
    for (i, rx) in receivers.iter_mut().enumerate() {
        let Ok(Delivery::Publication(first)) = rx.try_recv() else { panic!("subscriber {i} got nothing") };
        let expected = if i % 2 == 0 { "AAPL" } else { "MSFT" };
        assert_eq!(first.envelope().unwrap().p["once_test_symbol"], expected);
        assert!(rx.try_recv().is_err(), "subscriber {i} got one publication");
    }
    assert!(unfiltered_rx.try_recv().is_ok() && unfiltered_rx.try_recv().is_ok());
}

#[tokio::test]
async fn a_connection_gets_a_publication_when_any_matching_subscription_accepts_it() {
    let bus = MemoryBus::new();
    let (connection, mut rx) = bus_connection();
    let never = Filter::intern(&json!({"any_sub_test": "never"})).unwrap();
    bus.set_filter(connection.id(), "news", Some(never));
    bus.subscribe(&connection, "news");
    bus.subscribe(&connection, "n*");
    bus.subscribe(&connection, "ne*");
    let report = bus.publish(Publication::new("news", Envelope::new("x", json!({})))).await.unwrap();
    assert_eq!(report.delivered, 1);
    assert!(rx.try_recv().is_ok());
    assert!(rx.try_recv().is_err(), "at most once");
    // Unsubscribing clears the filter: subscribing again without one gets everything.
    bus.unsubscribe(connection.id(), "n*");
    bus.unsubscribe(connection.id(), "ne*");
    bus.unsubscribe(connection.id(), "news");
    bus.subscribe(&connection, "news");
    assert_eq!(bus.publish(Publication::new("news", Envelope::new("x", json!({})))).await.unwrap().delivered, 1);
}

async fn subscribe_filtered(client: &mut Client, topics: &[&str], filter: Value) -> Value {
    client
        .send("subscription_update", json!({"action": "subscribe", "topics": topics, "filter": filter}))
        .await
        .unwrap();
    loop {
        let message = client.recv().await.unwrap();
        if message["t"] == "subscription_update" {
            return message;
        }
    }
}

async fn next_symbol(client: &mut Client) -> Option<Value> {
    client.recv_timeout(Duration::from_millis(300)).await.unwrap().map(|m| m["p"]["symbol"].clone())
}

#[tokio::test]
async fn filtered_subscriptions_over_sockets() {
    let server = start(|_| {}).await;
    let mut apple = Client::connect(&server.url()).await.unwrap();
    let mut everything = Client::connect(&server.url()).await.unwrap();
    let ack = subscribe_filtered(&mut apple, &["ticks", "trades"], json!({"payload.symbol": "AAPL"})).await;
    assert_eq!(ack["p"]["success_topics"], json!(["ticks", "trades"]));
    assert!(ack["p"].get("filter_error").is_none());
    everything.subscribe(&["ticks"]).await.unwrap();

    for symbol in ["MSFT", "AAPL", "GOOG"] {
        server.engine.publish("ticks", Envelope::new("tick", json!({"symbol": symbol}))).await.unwrap();
    }
    assert_eq!(next_symbol(&mut apple).await, Some(json!("AAPL")));
    assert_eq!(next_symbol(&mut apple).await, None);
    for symbol in ["MSFT", "AAPL", "GOOG"] {
        assert_eq!(next_symbol(&mut everything).await, Some(json!(symbol)));
    }

    // Subscribing again replaces the filter (here: removes it) for the listed topic only.
    let ack = subscribe_filtered(&mut apple, &["ticks"], Value::Null).await;
    assert_eq!(ack["p"]["success_topics"], json!(["ticks"]));
    server.engine.publish("ticks", Envelope::new("tick", json!({"symbol": "MSFT"}))).await.unwrap();
    server.engine.publish("trades", Envelope::new("trade", json!({"symbol": "MSFT"}))).await.unwrap();
    assert_eq!(next_symbol(&mut apple).await, Some(json!("MSFT")));
    assert_eq!(next_symbol(&mut apple).await, None, "trades keeps its filter");
    server.stop().await;
}

#[tokio::test]
async fn invalid_filters_land_in_failed_topics() {
    let server = start(|_| {}).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    let mut bystander = Client::connect(&server.url()).await.unwrap();
    bystander.subscribe(&["ticks"]).await.unwrap();
    let mut deep = json!({"a": 1});
    for _ in 0..9 {
        deep = json!({"$or": [deep]});
    }
    for (filter, detail) in [
        (json!({"price": {"$near": 1}}), "unknown operator $near"),
        (json!({"symbol": {"$regex": "[z-a]"}}), "$regex pattern is invalid"),
        (deep, "nested deeper than 8 levels"),
        (json!({"symbol": {"$regex": "x".repeat(257)}}), "longer than 256 bytes"),
        (json!({"price": {"$in": 5}}), "$in needs an array"),
        (json!(["not", "an", "object"]), "must be a JSON object"),
    ] {
        let ack = subscribe_filtered(&mut client, &["ticks", "trades"], filter.clone()).await;
        let p = &ack["p"];
        assert_eq!(p["success"], false, "{filter}");
        assert_eq!(p["success_topics"], json!([]));
        assert_eq!(p["failed_topics"], json!(["ticks", "trades"]));
        assert_eq!(p["failure_reasons"], json!({"ticks": "INVALID_FILTER", "trades": "INVALID_FILTER"}));
        let error = p["filter_error"].as_str().unwrap();
        assert!(error.contains(detail), "{error:?} should mention {detail:?}");
    }
    // A failed filter subscribed nothing; the connection and the others keep working.
    server.engine.publish("ticks", Envelope::new("tick", json!({"symbol": "AAPL"}))).await.unwrap();
    assert_eq!(next_symbol(&mut client).await, None);
    assert_eq!(next_symbol(&mut bystander).await, Some(json!("AAPL")));
    assert_eq!(client.subscribe(&["ticks"]).await.unwrap()["p"]["success"], true);
    assert!(client.ping().await.is_ok());
    server.stop().await;
}

#[tokio::test]
async fn subscribers_sharing_a_filter_share_one_evaluation_over_sockets() {
    let server = start(|_| {}).await;
    let expression = json!({"socket_share_test": {"$gte": 10}});
    let shared = Filter::intern(&expression).unwrap();
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut client = Client::connect(&server.url()).await.unwrap();
        subscribe_filtered(&mut client, &["levels"], expression.clone()).await;
        clients.push(client);
    }
    for level in [5, 15] {
        server.engine.publish("levels", Envelope::new("level", json!({"socket_share_test": level}))).await.unwrap();
    }
    assert_eq!(shared.evaluations(), 2, "one evaluation per publication for five subscribers");
    for client in &mut clients {
        let message = client.recv().await.unwrap();
        assert_eq!(message["p"]["socket_share_test"], 15);
    }
    // The Rust API subscribes with a filter too.
    let id = ConnectionId::parse(clients[0].connection_id()).unwrap();
    let other = Filter::intern(&json!({"socket_share_test": {"$lt": 10}})).unwrap();
    assert!(server.engine.subscribe_filtered(id, "levels", Some(other)).unwrap());
    server.engine.publish("levels", Envelope::new("level", json!({"socket_share_test": 1}))).await.unwrap();
    assert_eq!(clients[0].recv().await.unwrap()["p"]["socket_share_test"], 1);
    assert!(clients[1].recv_timeout(Duration::from_millis(200)).await.unwrap().is_none());
    server.stop().await;
}
