//! Close codes switchboard sends, with the reasons it gives; the table in `docs/protocol.md`.

/// 1000: the purpose of the connection is fulfilled.
pub const NORMAL: u16 = 1000;
/// 1001: the server is shutting down.
pub const GOING_AWAY: u16 = 1001;
/// 1002: a frame broke RFC 6455.
pub const PROTOCOL_ERROR: u16 = 1002;
/// 1003: binary data on the text protocol.
pub const UNSUPPORTED_DATA: u16 = 1003;
/// 1005: no code in the peer's close frame (never sent, only logged).
pub const NO_STATUS: u16 = 1005;
/// 1006: the TCP connection ended without a close frame (never sent, only logged).
pub const ABNORMAL: u16 = 1006;
/// 1007: a text message was not UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
/// 1008: policy violation.
pub const POLICY: u16 = 1008;
/// 1009: a message over `--max-message-bytes`.
pub const TOO_BIG: u16 = 1009;
/// 1011: the server hit an unexpected condition.
pub const INTERNAL_ERROR: u16 = 1011;
/// 1013: over `--max-connections`; try again later.
pub const TRY_AGAIN_LATER: u16 = 1013;
/// 4000: no frame from the peer within `--idle-timeout-ms`.
pub const HEARTBEAT_TIMEOUT: u16 = 4000;
/// 4001: the peer did not read fast enough; its queue passed `--max-outbound-bytes`.
pub const SLOW_CONSUMER: u16 = 4001;

/// 4002: a backend disconnected the user through the push API (the usual code).
pub const KICKED: u16 = 4002;
/// 4003: the connection's signed token expired.
pub const TOKEN_EXPIRED: u16 = 4003;

/// Close codes counted individually in metrics; everything else is "other".
pub const COUNTED: [u16; 15] = [
    NORMAL,
    GOING_AWAY,
    PROTOCOL_ERROR,
    UNSUPPORTED_DATA,
    NO_STATUS,
    ABNORMAL,
    INVALID_PAYLOAD,
    POLICY,
    TOO_BIG,
    INTERNAL_ERROR,
    TRY_AGAIN_LATER,
    HEARTBEAT_TIMEOUT,
    SLOW_CONSUMER,
    KICKED,
    TOKEN_EXPIRED,
];

/// Whether a code received in a peer's close frame is valid on the wire (RFC 6455 §7.4).
pub fn is_valid_received(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}
