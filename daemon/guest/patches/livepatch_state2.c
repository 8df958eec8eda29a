/* State 0x1 at version 2: see livepatch_state.h. */
#define KLP_STATE_VERSION 2
#include "livepatch_state.h"
