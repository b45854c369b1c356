//! Stream positions (ids) of the redis backend.

/// The SSE id a one-channel stream shows for the event stored at `stream_id` in the channel's
/// history of epoch `epoch` (both as `ssehub_publish` answers them).
pub fn single_channel_id(epoch: &str, stream_id: &str) -> String {
    format!("{epoch}.{stream_id}")
}
