//! Typed request methods: one per client request, each checking the kind of its ack.

use switchboard_proto::v1::{
    ack, client_frame::Request, Conversation, ConversationCreateRequest, ConversationListRequest,
    ConversationMembersRequest, HistoryRequest, HistoryResult, PingRequest, PongResult,
    PresenceResult, PresenceSetRequest, PresenceWatchRequest, ReadRequest, SendRequest, SendResult,
    SyncCursor, SyncRequest, SyncResult, TypingRequest,
};

use crate::{Client, ClientError};

/// Content type of [`Client::send`].
pub const DEFAULT_CONTENT_TYPE: &str = "text/plain";

/// Direction of a history page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Older messages, newest first from `from_seq` (exclusive; 0 = from the newest).
    Backward,
    /// Newer messages, oldest first after `from_seq` (exclusive).
    Forward,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Backward => "backward",
            Direction::Forward => "forward",
        }
    }
}

/// Action of a `conversation_members` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembersAction {
    List,
    Add,
    Remove,
}

impl MembersAction {
    pub fn as_str(self) -> &'static str {
        match self {
            MembersAction::List => "list",
            MembersAction::Add => "add",
            MembersAction::Remove => "remove",
        }
    }
}

/// A new idempotency key for a send.
pub fn new_client_msg_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub(crate) fn unexpected(request: &str, result: &ack::Result) -> ClientError {
    let got = match result {
        ack::Result::Error(_) => "error",
        ack::Result::Send(_) => "send",
        ack::Result::History(_) => "history",
        ack::Result::Sync(_) => "sync",
        ack::Result::Ok(_) => "ok",
        ack::Result::Presence(_) => "presence",
        ack::Result::Conversation(_) => "conversation",
        ack::Result::Conversations(_) => "conversations",
        ack::Result::Pong(_) => "pong",
        ack::Result::Thread(_) => "thread",
        ack::Result::Receipts(_) => "receipts",
    };
    ClientError::Protocol(format!("`{request}` acked with a `{got}` result"))
}

pub(crate) fn strings(items: impl IntoIterator<Item = impl Into<String>>) -> Vec<String> {
    items.into_iter().map(Into::into).collect()
}

impl Client {
    /// Send a text message with a fresh idempotency key.
    pub async fn send(&self, conversation_id: &str, body: &str) -> Result<SendResult, ClientError> {
        self.send_with_id(
            conversation_id,
            &new_client_msg_id(),
            body,
            DEFAULT_CONTENT_TYPE,
        )
        .await
    }

    /// Send with a caller-chosen idempotency key: repeating the call with the same
    /// key returns the original message (`duplicate` set) instead of a new one.
    pub async fn send_with_id(
        &self,
        conversation_id: &str,
        client_msg_id: &str,
        body: &str,
        content_type: &str,
    ) -> Result<SendResult, ClientError> {
        self.send_request(SendRequest {
            conversation_id: conversation_id.to_owned(),
            client_msg_id: client_msg_id.to_owned(),
            body: body.to_owned(),
            content_type: content_type.to_owned(),
            ..Default::default()
        })
        .await
    }

    /// Send a prepared request (kept by callers that retry it).
    pub async fn send_request(&self, request: SendRequest) -> Result<SendResult, ClientError> {
        match self.request(Request::Send(request)).await? {
            ack::Result::Send(result) => Ok(result),
            other => Err(unexpected("send", &other)),
        }
    }

    /// One page of a conversation's history. `limit` 0 means the server default.
    pub async fn history(
        &self,
        conversation_id: &str,
        from_seq: u64,
        direction: Direction,
        limit: u32,
    ) -> Result<HistoryResult, ClientError> {
        let request = Request::History(HistoryRequest {
            conversation_id: conversation_id.to_owned(),
            from_seq,
            direction: direction.as_str().to_owned(),
            limit,
        });
        match self.request(request).await? {
            ack::Result::History(result) => Ok(result),
            other => Err(unexpected("history", &other)),
        }
    }

    /// What was missed since the cursors (see [`crate::Timeline::cursors`]).
    /// `limit_per_conversation` 0 means the server default.
    pub async fn sync(
        &self,
        cursors: Vec<SyncCursor>,
        limit_per_conversation: u32,
    ) -> Result<SyncResult, ClientError> {
        let request = Request::Sync(SyncRequest {
            cursors,
            limit_per_conversation,
        });
        match self.request(request).await? {
            ack::Result::Sync(result) => Ok(result),
            other => Err(unexpected("sync", &other)),
        }
    }

    /// Mark everything up to `seq` as read (see [`Client::mark`] for delivered).
    pub async fn read(&self, conversation_id: &str, seq: u64) -> Result<(), ClientError> {
        self.request(Request::Read(ReadRequest {
            conversation_id: conversation_id.to_owned(),
            seq,
            ..Default::default()
        }))
        .await
        .map(drop)
    }

    /// Start (`true`) or stop typing in a conversation.
    pub async fn typing(&self, conversation_id: &str, typing: bool) -> Result<(), ClientError> {
        self.request(Request::Typing(TypingRequest {
            conversation_id: conversation_id.to_owned(),
            typing,
        }))
        .await
        .map(drop)
    }

    /// Set this session's status ("online", "away", "busy" or "invisible"); see
    /// [`Client::presence_update`] for the status text and last-seen privacy.
    pub async fn presence_set(&self, status: &str) -> Result<(), ClientError> {
        self.request(Request::PresenceSet(PresenceSetRequest {
            status: status.to_owned(),
            ..Default::default()
        }))
        .await
        .map(drop)
    }

    /// Watch users' presence: returns their current presence; changes then arrive
    /// as presence events.
    pub async fn presence_watch(
        &self,
        user_ids: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<PresenceResult, ClientError> {
        let request = Request::PresenceWatch(PresenceWatchRequest {
            user_ids: strings(user_ids),
        });
        match self.request(request).await? {
            ack::Result::Presence(result) => Ok(result),
            // A server may ack a watch with a plain ok; changes still arrive as events.
            ack::Result::Ok(_) => Ok(PresenceResult::default()),
            other => Err(unexpected("presence_watch", &other)),
        }
    }

    /// Create (or get) the direct conversation with another user.
    pub async fn create_direct(&self, other_user: &str) -> Result<Conversation, ClientError> {
        self.create(ConversationCreateRequest {
            kind: "direct".into(),
            members: vec![other_user.to_owned()],
            name: String::new(),
        })
        .await
    }

    /// Create a group with the caller as owner and `members` besides the caller.
    pub async fn create_group(
        &self,
        name: &str,
        members: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Conversation, ClientError> {
        self.create(ConversationCreateRequest {
            kind: "group".into(),
            members: strings(members),
            name: name.to_owned(),
        })
        .await
    }

    async fn create(
        &self,
        request: ConversationCreateRequest,
    ) -> Result<Conversation, ClientError> {
        match self.request(Request::ConversationCreate(request)).await? {
            ack::Result::Conversation(conversation) => Ok(conversation),
            other => Err(unexpected("conversation_create", &other)),
        }
    }

    /// List, add or remove members. Returns the conversation when the server's ack
    /// carries it (always for `List`), `None` for a plain ok.
    pub async fn members(
        &self,
        conversation_id: &str,
        action: MembersAction,
        user_ids: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Option<Conversation>, ClientError> {
        let request = Request::ConversationMembers(ConversationMembersRequest {
            conversation_id: conversation_id.to_owned(),
            action: action.as_str().to_owned(),
            user_ids: strings(user_ids),
        });
        match self.request(request).await? {
            ack::Result::Conversation(conversation) => Ok(Some(conversation)),
            ack::Result::Ok(_) if action != MembersAction::List => Ok(None),
            other => Err(unexpected("conversation_members", &other)),
        }
    }

    /// The conversation with its members.
    pub async fn members_list(&self, conversation_id: &str) -> Result<Conversation, ClientError> {
        let conversation = self
            .members(conversation_id, MembersAction::List, Vec::<String>::new())
            .await?;
        conversation.ok_or_else(|| ClientError::Protocol("member list without conversation".into()))
    }

    /// The caller's conversations.
    pub async fn conversations(&self) -> Result<Vec<Conversation>, ClientError> {
        match self
            .request(Request::ConversationList(ConversationListRequest {}))
            .await?
        {
            ack::Result::Conversations(result) => Ok(result.conversations),
            other => Err(unexpected("conversation_list", &other)),
        }
    }

    /// Round trip to the server.
    pub async fn ping(&self) -> Result<PongResult, ClientError> {
        match self.request(Request::Ping(PingRequest {})).await? {
            ack::Result::Pong(pong) => Ok(pong),
            other => Err(unexpected("ping", &other)),
        }
    }
}
