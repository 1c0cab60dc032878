//! Typed request methods of the conversation features: replies, threads and
//! mentions on send, edits, deletes, reactions, receipts, group administration,
//! notification preferences and rich presence. Like [`crate::requests`], each
//! method checks the kind of its ack.

use switchboard_proto::v1::{
    ack, client_frame::Request, ConversationUpdateRequest, DeleteRequest, EditRequest,
    NotificationSetRequest, PresenceSetRequest, ReactRequest, ReadRequest, ReceiptsRequest,
    ReceiptsResult, SendRequest, SendResult, ThreadRequest, ThreadResult, UserPresence,
};

use crate::requests::{strings, unexpected};
use crate::{new_client_msg_id, Client, ClientError, DEFAULT_CONTENT_TYPE};

/// Optional parts of a message: reply, thread, mentions, content type and
/// idempotency key. `SendOptions::default()` sends a plain text message with a
/// fresh key, like [`Client::send`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendOptions {
    /// Idempotency key; empty means a fresh one per call.
    pub client_msg_id: String,
    /// Content type; empty means [`DEFAULT_CONTENT_TYPE`].
    pub content_type: String,
    /// The message replied to (0 = not a reply).
    pub reply_to_seq: u64,
    /// The root of the thread the message is posted in (0 = the main timeline).
    pub thread_root_seq: u64,
    /// Users mentioned (members of the conversation, at most 50).
    pub mentions: Vec<String>,
}

impl SendOptions {
    pub fn new() -> SendOptions {
        SendOptions::default()
    }

    pub fn client_msg_id(mut self, client_msg_id: impl Into<String>) -> SendOptions {
        self.client_msg_id = client_msg_id.into();
        self
    }

    pub fn content_type(mut self, content_type: impl Into<String>) -> SendOptions {
        self.content_type = content_type.into();
        self
    }

    pub fn reply_to(mut self, seq: u64) -> SendOptions {
        self.reply_to_seq = seq;
        self
    }

    pub fn in_thread(mut self, root_seq: u64) -> SendOptions {
        self.thread_root_seq = root_seq;
        self
    }

    pub fn mention(mut self, user_id: impl Into<String>) -> SendOptions {
        self.mentions.push(user_id.into());
        self
    }

    /// The send request for `body` in `conversation_id`, with a fresh idempotency
    /// key if none was chosen (keep the request to retry it under the same key).
    pub fn request(&self, conversation_id: &str, body: &str) -> SendRequest {
        SendRequest {
            conversation_id: conversation_id.to_owned(),
            client_msg_id: or_new_id(&self.client_msg_id),
            body: body.to_owned(),
            content_type: if self.content_type.is_empty() {
                DEFAULT_CONTENT_TYPE.to_owned()
            } else {
                self.content_type.clone()
            },
            reply_to_seq: self.reply_to_seq,
            thread_root_seq: self.thread_root_seq,
            mentions: self.mentions.clone(),
        }
    }
}

/// Which marker a `read` request raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkerKind {
    /// Everything up to the sequence was read (also raises delivered).
    Read,
    /// Everything up to the sequence reached a device of the user.
    Delivered,
}

impl MarkerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MarkerKind::Read => "read",
            MarkerKind::Delivered => "delivered",
        }
    }
}

/// A change of the caller's presence; fields left `None` stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PresenceUpdate {
    /// "online", "away", "busy" or "invisible" (this session).
    pub status: Option<String>,
    /// Custom status text (at most 128 bytes); `Some("")` clears it.
    pub status_text: Option<String>,
    /// "everyone", "contacts" or "nobody".
    pub last_seen_privacy: Option<String>,
}

impl PresenceUpdate {
    pub fn new() -> PresenceUpdate {
        PresenceUpdate::default()
    }

    pub fn status(mut self, status: impl Into<String>) -> PresenceUpdate {
        self.status = Some(status.into());
        self
    }

    pub fn status_text(mut self, text: impl Into<String>) -> PresenceUpdate {
        self.status_text = Some(text.into());
        self
    }

    pub fn last_seen_privacy(mut self, privacy: impl Into<String>) -> PresenceUpdate {
        self.last_seen_privacy = Some(privacy.into());
        self
    }

    fn into_request(self) -> PresenceSetRequest {
        PresenceSetRequest {
            status: self.status.unwrap_or_default(),
            status_text: self.status_text,
            last_seen_privacy: self.last_seen_privacy.unwrap_or_default(),
        }
    }
}

fn or_new_id(client_msg_id: &str) -> String {
    if client_msg_id.is_empty() {
        new_client_msg_id()
    } else {
        client_msg_id.to_owned()
    }
}

impl Client {
    /// Send a message with a reply, thread, mentions or other [`SendOptions`].
    pub async fn send_with(
        &self,
        conversation_id: &str,
        body: &str,
        options: &SendOptions,
    ) -> Result<SendResult, ClientError> {
        self.send_request(options.request(conversation_id, body))
            .await
    }

    /// Replace the body of one of the caller's messages (fresh idempotency key,
    /// content type [`DEFAULT_CONTENT_TYPE`]). Returns the edit event's sequence.
    pub async fn edit(
        &self,
        conversation_id: &str,
        seq: u64,
        body: &str,
    ) -> Result<SendResult, ClientError> {
        self.edit_request(EditRequest {
            conversation_id: conversation_id.to_owned(),
            seq,
            client_msg_id: new_client_msg_id(),
            body: body.to_owned(),
            content_type: DEFAULT_CONTENT_TYPE.to_owned(),
        })
        .await
    }

    /// An edit with every field chosen by the caller.
    pub async fn edit_request(&self, request: EditRequest) -> Result<SendResult, ClientError> {
        match self.request(Request::Edit(request)).await? {
            ack::Result::Send(result) => Ok(result),
            other => Err(unexpected("edit", &other)),
        }
    }

    /// Delete a message (the caller's own, or any as a group owner or admin).
    pub async fn delete(&self, conversation_id: &str, seq: u64) -> Result<SendResult, ClientError> {
        let request = Request::Delete(DeleteRequest {
            conversation_id: conversation_id.to_owned(),
            seq,
            client_msg_id: new_client_msg_id(),
        });
        match self.request(request).await? {
            ack::Result::Send(result) => Ok(result),
            other => Err(unexpected("delete", &other)),
        }
    }

    /// React to a message with `emoji`.
    pub async fn react(
        &self,
        conversation_id: &str,
        seq: u64,
        emoji: &str,
    ) -> Result<SendResult, ClientError> {
        self.reaction(conversation_id, seq, emoji, false).await
    }

    /// Take back the caller's `emoji` reaction to a message.
    pub async fn unreact(
        &self,
        conversation_id: &str,
        seq: u64,
        emoji: &str,
    ) -> Result<SendResult, ClientError> {
        self.reaction(conversation_id, seq, emoji, true).await
    }

    async fn reaction(
        &self,
        conversation_id: &str,
        seq: u64,
        emoji: &str,
        remove: bool,
    ) -> Result<SendResult, ClientError> {
        let request = Request::React(ReactRequest {
            conversation_id: conversation_id.to_owned(),
            seq,
            emoji: emoji.to_owned(),
            remove,
            client_msg_id: new_client_msg_id(),
        });
        match self.request(request).await? {
            ack::Result::Send(result) => Ok(result),
            other => Err(unexpected("react", &other)),
        }
    }

    /// The replies of a thread after `from_seq` (exclusive), oldest first, with its
    /// root. `limit` 0 means the server default.
    pub async fn thread(
        &self,
        conversation_id: &str,
        root_seq: u64,
        from_seq: u64,
        limit: u32,
    ) -> Result<ThreadResult, ClientError> {
        let request = Request::Thread(ThreadRequest {
            conversation_id: conversation_id.to_owned(),
            root_seq,
            from_seq,
            limit,
        });
        match self.request(request).await? {
            ack::Result::Thread(result) => Ok(result),
            other => Err(unexpected("thread", &other)),
        }
    }

    /// Read and delivery receipts for message `seq` (0 = the latest).
    pub async fn receipts(
        &self,
        conversation_id: &str,
        seq: u64,
    ) -> Result<ReceiptsResult, ClientError> {
        let request = Request::Receipts(ReceiptsRequest {
            conversation_id: conversation_id.to_owned(),
            seq,
        });
        match self.request(request).await? {
            ack::Result::Receipts(result) => Ok(result),
            other => Err(unexpected("receipts", &other)),
        }
    }

    /// Raise the caller's read or delivered marker to `seq`.
    pub async fn mark(
        &self,
        conversation_id: &str,
        seq: u64,
        kind: MarkerKind,
    ) -> Result<(), ClientError> {
        self.request(Request::Read(ReadRequest {
            conversation_id: conversation_id.to_owned(),
            seq,
            kind: kind.as_str().to_owned(),
        }))
        .await
        .map(drop)
    }

    /// Mark everything up to `seq` as delivered to this user.
    pub async fn delivered(&self, conversation_id: &str, seq: u64) -> Result<(), ClientError> {
        self.mark(conversation_id, seq, MarkerKind::Delivered).await
    }

    /// Change a group (the request's `client_msg_id` is filled with a fresh key
    /// when empty). Returns the sequence of the system event recording the change.
    pub async fn conversation_update(
        &self,
        mut request: ConversationUpdateRequest,
    ) -> Result<SendResult, ClientError> {
        request.client_msg_id = or_new_id(&request.client_msg_id);
        match self.request(Request::ConversationUpdate(request)).await? {
            ack::Result::Send(result) => Ok(result),
            other => Err(unexpected("conversation_update", &other)),
        }
    }

    async fn update_users(
        &self,
        conversation_id: &str,
        action: &str,
        user_ids: Vec<String>,
        role: &str,
    ) -> Result<SendResult, ClientError> {
        self.conversation_update(ConversationUpdateRequest {
            conversation_id: conversation_id.to_owned(),
            action: action.to_owned(),
            user_ids,
            role: role.to_owned(),
            ..Default::default()
        })
        .await
    }

    /// Rename a group.
    pub async fn rename(
        &self,
        conversation_id: &str,
        name: &str,
    ) -> Result<SendResult, ClientError> {
        self.conversation_update(ConversationUpdateRequest {
            conversation_id: conversation_id.to_owned(),
            action: "rename".into(),
            name: name.to_owned(),
            ..Default::default()
        })
        .await
    }

    /// Set a group's topic.
    pub async fn set_topic(
        &self,
        conversation_id: &str,
        topic: &str,
    ) -> Result<SendResult, ClientError> {
        self.conversation_update(ConversationUpdateRequest {
            conversation_id: conversation_id.to_owned(),
            action: "topic".into(),
            topic: topic.to_owned(),
            ..Default::default()
        })
        .await
    }

    /// Add members to a group.
    pub async fn add_members(
        &self,
        conversation_id: &str,
        user_ids: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<SendResult, ClientError> {
        self.update_users(conversation_id, "add", strings(user_ids), "")
            .await
    }

    /// Remove members from a group.
    pub async fn kick(
        &self,
        conversation_id: &str,
        user_ids: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<SendResult, ClientError> {
        self.update_users(conversation_id, "kick", strings(user_ids), "")
            .await
    }

    /// Remove members from a group and keep them from being added again.
    pub async fn ban(
        &self,
        conversation_id: &str,
        user_ids: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<SendResult, ClientError> {
        self.update_users(conversation_id, "ban", strings(user_ids), "")
            .await
    }

    /// Lift bans.
    pub async fn unban(
        &self,
        conversation_id: &str,
        user_ids: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<SendResult, ClientError> {
        self.update_users(conversation_id, "unban", strings(user_ids), "")
            .await
    }

    /// Leave a group.
    pub async fn leave(&self, conversation_id: &str) -> Result<SendResult, ClientError> {
        self.update_users(conversation_id, "leave", Vec::new(), "")
            .await
    }

    /// Give members a role: "admin", "member", or "owner" (one user; transfers
    /// ownership).
    pub async fn set_role(
        &self,
        conversation_id: &str,
        user_ids: impl IntoIterator<Item = impl Into<String>>,
        role: &str,
    ) -> Result<SendResult, ClientError> {
        self.update_users(conversation_id, "role", strings(user_ids), role)
            .await
    }

    /// Set a notification preference: with a conversation id, mute it until
    /// `until_ms`; with "" do not disturb until `until_ms` (-1 = until turned off,
    /// 0 = off).
    pub async fn notification_set(
        &self,
        conversation_id: &str,
        until_ms: i64,
    ) -> Result<(), ClientError> {
        self.request(Request::NotificationSet(NotificationSetRequest {
            conversation_id: conversation_id.to_owned(),
            until_ms,
        }))
        .await
        .map(drop)
    }

    /// Mute a conversation until `until_ms` (-1 = forever, 0 = unmute).
    pub async fn mute(&self, conversation_id: &str, until_ms: i64) -> Result<(), ClientError> {
        self.notification_set(conversation_id, until_ms).await
    }

    /// Do not disturb until `until_ms` (-1 = until turned off, 0 = off).
    pub async fn do_not_disturb(&self, until_ms: i64) -> Result<(), ClientError> {
        self.notification_set("", until_ms).await
    }

    /// Change the caller's presence: this session's status, the status text, the
    /// last-seen privacy. Returns the caller's own presence after the change when
    /// the server's ack carries it (`None` for a plain ok).
    pub async fn presence_update(
        &self,
        update: PresenceUpdate,
    ) -> Result<Option<UserPresence>, ClientError> {
        match self
            .request(Request::PresenceSet(update.into_request()))
            .await?
        {
            ack::Result::Presence(result) => Ok(result.users.into_iter().next()),
            ack::Result::Ok(_) => Ok(None),
            other => Err(unexpected("presence_set", &other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_options_fill_the_request_and_default_like_send() {
        let plain = SendOptions::new().request("c", "hi");
        assert_eq!(plain.content_type, DEFAULT_CONTENT_TYPE);
        assert!(!plain.client_msg_id.is_empty());
        assert_eq!((plain.reply_to_seq, plain.thread_root_seq), (0, 0));

        let options = SendOptions::new()
            .client_msg_id("k1")
            .content_type("text/markdown")
            .reply_to(3)
            .in_thread(2)
            .mention("bob")
            .mention("carol");
        let request = options.request("c", "hi");
        assert_eq!(request.client_msg_id, "k1");
        assert_eq!(request.content_type, "text/markdown");
        assert_eq!((request.reply_to_seq, request.thread_root_seq), (3, 2));
        assert_eq!(request.mentions, ["bob", "carol"]);
        // A chosen key is kept for every request built from the options.
        assert_eq!(options.request("c", "again").client_msg_id, "k1");
    }

    #[test]
    fn presence_update_leaves_unset_fields_unchanged() {
        let request = PresenceUpdate::new().status("busy").into_request();
        assert_eq!(request.status, "busy");
        assert_eq!(request.status_text, None);
        assert_eq!(request.last_seen_privacy, "");

        let request = PresenceUpdate::new()
            .status_text("")
            .last_seen_privacy("nobody")
            .into_request();
        assert_eq!(request.status, "");
        assert_eq!(request.status_text.as_deref(), Some(""));
        assert_eq!(request.last_seen_privacy, "nobody");
    }
}
